//! URL transports for snapshots: `file://`, `tcp://`, `tls://`, `unix://`.
//!
//! [`send_snapshot`] and [`recv_snapshot`] pick the transport from the URL's scheme
//! (parsed with the `url` crate). A scheme no transport handles is
//! [`MigratableError::UnsupportedScheme`].
//!
//! - `file:///path`: the container's file form, written atomically
//!   ([`crate::file::write_snapshot_file`]).
//! - `tcp://host:port`, `tls://host:port`, `unix:///path`: the **receiver listens** (binds, accepts one
//!   connection), the **sender connects**, retrying a refused connection for up to
//!   [`CONNECT_RETRY`], so either side may start first. The sender writes the
//!   container's stream form (self-delimiting: it ends with an END record); the
//!   receiver answers with an accept or reject reply carrying its reason
//!   (`docs/format.md` §9), so a rejected sender gets
//!   [`TransportError::Rejected`] with the receiver's message, not a bare close.
//!
//! `tls://` needs TLS credentials and plaintext `tcp://` listens on loopback only unless
//! allowed: [`send_snapshot_secure`] and [`recv_snapshot_secure`] take a [`Security`]
//! (`docs/security.md`).
//!
//! [`send_to_stream`] and [`recv_from_stream`] run the same exchange over any
//! connected stream (a socketpair, an accepted connection).
//!
//! ```no_run
//! use migration_core::codec::CodecRegistry;
//! use migration_core::{transport, Snapshot};
//!
//! # fn codecs() -> CodecRegistry { CodecRegistry::new() }
//! // Receiver (another process or thread):
//! let received = std::thread::spawn(|| transport::recv_snapshot("tcp://127.0.0.1:4444", &codecs()));
//! // Sender:
//! transport::send_snapshot(&Snapshot::new("vm"), "tcp://127.0.0.1:4444", &codecs())?;
//! assert_eq!(received.join().unwrap()?.id(), "vm");
//! # Ok::<(), migration_core::MigratableError>(())
//! ```

use std::borrow::Cow;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::box_error::BoxError;
use crate::codec::{CodecError, CodecRegistry};
use crate::container::{self, ReadOptions, WriteOptions, WriteSummary};
use crate::deadline::Deadline;
use crate::endpoint::Endpoint;
use crate::error::MigratableError;
use crate::file;
use crate::memory::{MemorySink, MemorySource};
use crate::security::{Security, SecurityError};
use crate::snapshot::Snapshot;

/// How long a sender keeps retrying a refused connection.
pub const CONNECT_RETRY: Duration = Duration::from_secs(10);
/// Longest reason a receiver sends in a reject reply.
pub const MAX_REPLY_MESSAGE: usize = 4096;
/// How long a receiver ([`recv_snapshot`], [`recv_snapshot_with_memory`]) gives a
/// connected sender to deliver the whole container; see
/// [`recv_snapshot_within`] to choose another.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a receiver waits for the next bytes from a connected sender.
pub const RECV_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a rejecting receiver keeps draining what the sender still writes.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

const REPLY_MAGIC: [u8; 4] = *b"VMSR";

/// Errors of the socket exchange, inside [`MigratableError::Send`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The receiver rejected the snapshot and said why.
    #[error("the receiver rejected the snapshot: {reason}")]
    Rejected {
        /// The receiver's message.
        reason: String,
    },
    /// The receiver's reply is not a reply.
    #[error("bad reply from the receiver: {0}")]
    BadReply(String),
}

/// Where a URL points: a file, or a socket [`Endpoint`].
enum Target {
    File(PathBuf),
    Socket(Endpoint),
}

fn parse(url: &str) -> Result<Target, MigratableError> {
    match url::Url::parse(url) {
        Ok(u) if u.scheme() == "file" => {
            u.to_file_path()
                .map(Target::File)
                .map_err(|()| MigratableError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "expected file:///absolute/path".to_owned(),
                })
        }
        _ => Endpoint::parse(url).map(Target::Socket),
    }
}

/// `snapshot` with typed sections encoded by `codecs`' preferred codec.
fn encoded<'a>(
    snapshot: &'a Snapshot,
    codecs: &CodecRegistry,
) -> Result<Cow<'a, Snapshot>, MigratableError> {
    if snapshot.is_encoded() {
        return Ok(Cow::Borrowed(snapshot));
    }
    let codec = codecs.preferred().ok_or_else(|| MigratableError::Codec {
        path: snapshot.id().to_owned(),
        section: String::new(),
        source: CodecError::NotEncoded,
    })?;
    let mut owned = snapshot.clone();
    owned.encode(codec)?;
    Ok(Cow::Owned(owned))
}

/// Sends `snapshot` to `url`, encoding sections that still hold typed state with
/// `codecs`' preferred codec.
pub fn send_snapshot(
    snapshot: &Snapshot,
    url: &str,
    codecs: &CodecRegistry,
) -> Result<(), MigratableError> {
    send_snapshot_with_memory(snapshot, None, url, codecs)
}

/// Receives a snapshot from `url`, resolving section codecs through `codecs`.
pub fn recv_snapshot(url: &str, codecs: &CodecRegistry) -> Result<Snapshot, MigratableError> {
    recv_snapshot_with_memory(url, codecs, None)
}

fn send_err(url: &str, e: MigratableError) -> MigratableError {
    match e {
        MigratableError::Io(e) => MigratableError::Send {
            url: url.to_owned(),
            source: e.into(),
        },
        other => other,
    }
}

fn recv_err(url: &str, e: MigratableError) -> MigratableError {
    match e {
        MigratableError::Io(e) => MigratableError::Receive {
            url: url.to_owned(),
            source: e.into(),
        },
        other => other,
    }
}

/// Sends `snapshot` and, if given, all of `memory` to `url` (zero pages are holes in a
/// file and are not sent over a socket). For `tls://` see [`send_snapshot_secure`].
pub fn send_snapshot_with_memory(
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    url: &str,
    codecs: &CodecRegistry,
) -> Result<(), MigratableError> {
    send_snapshot_secure(snapshot, memory, url, codecs, &Security::plaintext())
}

/// [`send_snapshot_with_memory`] under `security`: `tls://host:port` with TLS
/// credentials (the handshake and the receiver's authorization of this sender complete
/// before a byte of the snapshot is sent).
pub fn send_snapshot_secure(
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    url: &str,
    codecs: &CodecRegistry,
    security: &Security,
) -> Result<(), MigratableError> {
    let endpoint = parse(url)?;
    let snapshot = encoded(snapshot, codecs)?;
    let options = WriteOptions::default();
    let result = match endpoint {
        Target::File(path) => {
            file::write_snapshot_file(path, &snapshot, memory, &options).map(drop)
        }
        Target::Socket(endpoint) => connect(|| endpoint.connect_with(security, None))
            .and_then(|mut s| send_to_stream(&mut s, &snapshot, memory, &options).map(drop)),
    };
    result.map_err(|e| match e {
        MigratableError::Send { source, .. } => MigratableError::Send {
            url: url.to_owned(),
            source,
        },
        other => send_err(url, other),
    })
}

/// Receives a snapshot from `url` (listening, for sockets), with codecs resolved and
/// memory restored into `sink` if given (zero pages zeroed). Plaintext `tcp://` listens
/// on loopback addresses only; see [`recv_snapshot_secure`]. A connected sender has
/// [`RECV_TIMEOUT`] to deliver it all.
pub fn recv_snapshot_with_memory(
    url: &str,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
) -> Result<Snapshot, MigratableError> {
    recv_snapshot_within(url, codecs, sink, RECV_TIMEOUT)
}

/// [`recv_snapshot_with_memory`] with the time a connected sender has to deliver the
/// whole container: a sender that is slower (one byte a second keeps every read
/// alive) fails with a timed-out error, and so does one silent for
/// [`RECV_IDLE_TIMEOUT`]. Waiting for the sender to connect is not limited.
pub fn recv_snapshot_within(
    url: &str,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    timeout: Duration,
) -> Result<Snapshot, MigratableError> {
    recv_snapshot_guarded(url, codecs, sink, &Security::plaintext(), timeout)
}

/// [`recv_snapshot_with_memory`] under `security`: `tls://host:port` with TLS
/// credentials, or plaintext on a non-loopback address with [`Security::insecure`].
/// The sender is authenticated and authorized before a byte of the snapshot is read;
/// a plaintext sender on a TLS listener gets a reject reply saying TLS is required.
/// A connected sender has [`RECV_TIMEOUT`] to deliver the snapshot.
pub fn recv_snapshot_secure(
    url: &str,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    security: &Security,
) -> Result<Snapshot, MigratableError> {
    recv_snapshot_guarded(url, codecs, sink, security, RECV_TIMEOUT)
}

fn recv_snapshot_guarded(
    url: &str,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    security: &Security,
    timeout: Duration,
) -> Result<Snapshot, MigratableError> {
    let endpoint = parse(url)?;
    let options = ReadOptions::default();
    let result = match endpoint {
        Target::File(path) => file::read_snapshot_file(path, codecs, sink),
        Target::Socket(endpoint) => endpoint
            .bind_with(security)
            .map_err(MigratableError::from)
            .and_then(|l| {
                let accepted = l.accept_with(security, Some(RECV_IDLE_TIMEOUT), |plain, e| {
                    let _ = write_reply(plain, Some(&e.to_string()));
                });
                if let Endpoint::Unix(path) = &endpoint {
                    let _ = std::fs::remove_file(path);
                }
                let mut s = accepted?;
                let r = recv_from_stream_within(&mut s, codecs, sink, &options, Some(timeout));
                if r.is_err() {
                    let _ = s.shutdown_write();
                    let _ = s.set_read_timeout(Some(DRAIN_TIMEOUT));
                    drain(&mut s);
                }
                r
            }),
    };
    result.map_err(|e| recv_err(url, e))
}

fn connect<S>(f: impl Fn() -> Result<S, SecurityError>) -> Result<S, MigratableError> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(s) => return Ok(s),
            Err(SecurityError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) && start.elapsed() < CONNECT_RETRY =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Discards what the peer still sends, until it closes or the read times out.
fn drain(s: &mut impl Read) {
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < DRAIN_TIMEOUT * 4 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Sends `snapshot` (every section encoded) and `memory` over a connected `stream` in
/// the stream form, then waits for the receiver's reply. A rejection is
/// [`MigratableError::Send`] with a [`TransportError::Rejected`] source holding the
/// receiver's reason; if writing fails, the reply is still looked for, so a receiver
/// that rejected early is reported as such.
pub fn send_to_stream<S: Read + Write>(
    stream: &mut S,
    snapshot: &Snapshot,
    memory: Option<&dyn MemorySource>,
    options: &WriteOptions,
) -> Result<WriteSummary, MigratableError> {
    let written = {
        let mut w = BufWriter::with_capacity(1 << 16, &mut *stream);
        container::write_snapshot_stream(&mut w, snapshot, memory, options)
            .and_then(|s| w.flush().map(|()| s).map_err(MigratableError::Io))
    };
    let reply = read_reply(stream);
    let rejected = |source: BoxError| MigratableError::Send {
        url: String::new(),
        source,
    };
    match (written, reply) {
        (_, Ok(Some(reason))) => Err(rejected(Box::new(TransportError::Rejected { reason }))),
        (Ok(summary), Ok(None)) => Ok(summary),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(rejected(Box::new(e))),
    }
}

/// Reads the reply: `Ok(None)` accepted, `Ok(Some(reason))` rejected.
fn read_reply(r: &mut impl Read) -> Result<Option<String>, TransportError> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head)
        .map_err(|e| TransportError::BadReply(format!("no reply: {e}")))?;
    if head[..4] != REPLY_MAGIC {
        return Err(TransportError::BadReply(format!(
            "magic {:02x?}",
            &head[..4]
        )));
    }
    let status = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if len > MAX_REPLY_MESSAGE {
        return Err(TransportError::BadReply(format!("message of {len} bytes")));
    }
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg)
        .map_err(|e| TransportError::BadReply(format!("truncated message: {e}")))?;
    match status {
        0 if len == 0 => Ok(None),
        1 => Ok(Some(String::from_utf8_lossy(&msg).into_owned())),
        s => Err(TransportError::BadReply(format!(
            "status {s} with {len} bytes"
        ))),
    }
}

fn write_reply(w: &mut impl Write, rejection: Option<&str>) -> io::Result<()> {
    let msg = rejection.map_or(&b""[..], |m| {
        let mut end = m.len().min(MAX_REPLY_MESSAGE);
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        &m.as_bytes()[..end]
    });
    let mut b = Vec::with_capacity(12 + msg.len());
    b.extend_from_slice(&REPLY_MAGIC);
    b.extend_from_slice(&u32::from(rejection.is_some()).to_le_bytes());
    b.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    b.extend_from_slice(msg);
    w.write_all(&b)?;
    w.flush()
}

/// Receives a stream-form snapshot from a connected `stream` and replies: accepted, or
/// rejected with the error's message (which is also returned).
pub fn recv_from_stream<S: Read + Write>(
    stream: &mut S,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    options: &ReadOptions,
) -> Result<Snapshot, MigratableError> {
    recv_from_stream_within(stream, codecs, sink, options, None)
}

/// [`recv_from_stream`] that fails once `timeout` has passed (`None`: never) before
/// the container's END record arrived.
pub fn recv_from_stream_within<S: Read + Write>(
    stream: &mut S,
    codecs: &CodecRegistry,
    sink: Option<&dyn MemorySink>,
    options: &ReadOptions,
    timeout: Option<Duration>,
) -> Result<Snapshot, MigratableError> {
    let result = {
        let mut timed = Deadline::new(&mut *stream);
        if let Some(t) = timeout {
            timed.set_in(t);
        }
        let mut r = BufReader::with_capacity(1 << 16, timed);
        container::read_snapshot_stream(&mut r, codecs, sink, options)
    };
    let reason = result.as_ref().err().map(ToString::to_string);
    // The reply is best effort when the peer is already gone.
    let replied = write_reply(stream, reason.as_deref());
    let snapshot = result?;
    replied?;
    Ok(snapshot)
}
