//! The live-migration wire protocol: frames, messages, and their errors.
//!
//! [`docs/protocol.md`](https://github.com/rust-vmm/vm-migration/blob/main/docs/protocol.md)
//! specifies it byte by byte. In short: every message is a frame
//!
//! ```text
//! offset  size  field
//! 0       2     message type (u16 LE)
//! 2       2     flags (u16 LE, must be 0)
//! 4       4     payload length n (u32 LE), at most MAX_PAYLOAD
//! 8       n     payload
//! 8+n     8     CRC-64/NVME of bytes [0, 8+n)
//! ```
//!
//! [`Message::decode`] turns a checked frame into a typed message; it reads untrusted
//! bytes and bounds every count before allocating.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::arch::Arch;
use crate::codec::CodecId;
use crate::convergence::ConvergenceFailure;
use crate::deadline::Deadline;
use crate::error::MigratableError;
use crate::memory::{check_range, MemoryError, MemoryRange, MemorySink};
use crate::security::SecurityError;

/// The protocol version this crate speaks (version 3 adds feature bits to HELLO and
/// HELLO_ACK).
pub const PROTOCOL_VERSION: u32 = 3;
/// The oldest protocol version this crate still speaks (version 1 has no zero-page
/// message: zero pages travel as data).
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Feature bit: postcopy (the destination resumes before every page has arrived).
pub const FEATURE_POSTCOPY: u64 = 1 << 0;
/// Feature bit: local migration, guest memory handed over as file descriptors.
pub const FEATURE_LOCAL_MEMORY: u64 = 1 << 1;
/// Feature bit: memory moved over several connections.
pub const FEATURE_MULTI_CONNECTION: u64 = 1 << 2;
/// Every feature bit this crate knows. A destination accepts at most the offered bits
/// it knows and its caller enabled; a source refuses a HELLO_ACK accepting a bit it did
/// not offer.
pub const KNOWN_FEATURES: u64 = FEATURE_POSTCOPY | FEATURE_LOCAL_MEMORY | FEATURE_MULTI_CONNECTION;
/// The first protocol version with feature bits.
pub const FEATURES_SINCE: u32 = 3;

/// Magic at the start of the HELLO payload.
pub const MAGIC: [u8; 8] = *b"VMMIGRT\0";
/// Largest frame payload.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Largest memory chunk in one MEMORY frame.
pub const MAX_MEMORY_CHUNK: usize = 4 << 20;
/// Largest serialized device-state tree (sent in several STATE frames): the one
/// limit codecs decode up to as well ([`MAX_ENCODED_LEN`](crate::codec::MAX_ENCODED_LEN)),
/// so a destination never buffers state its codec would refuse.
pub const MAX_STATE: usize = crate::codec::MAX_ENCODED_LEN;
/// Most memory regions a layout may have.
pub const MAX_REGIONS: usize = 1024;
/// Most codecs a HELLO may offer.
pub const MAX_CODECS: usize = 64;
/// Largest opaque VM configuration in a HELLO.
pub const MAX_CONFIG: usize = 1 << 20;
/// Longest ABORT reason, producer name.
pub const MAX_TEXT: usize = 4096;
/// Most ranges in one ZERO frame.
pub const MAX_ZERO_RANGES: usize = 65536;
/// Most ranges in one POSTCOPY_PENDING or RECOVER_ACK frame.
pub const MAX_PENDING_RANGES: usize = 65536;
/// Most connections a multi-connection migration may use, the primary included
/// (see [`crate::multi`]).
pub const MAX_CONNECTIONS: usize = 16;
/// Length of a multi-connection session token.
pub const SESSION_TOKEN_LEN: usize = 32;

const HEADER: usize = 8;
const TRAILER: usize = 8;

/// Message types (the u16 at offset 0 of a frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageType {
    /// Source → destination: versions, architecture, codecs, layout, config.
    Hello = 1,
    /// Destination → source: chosen version and codec.
    HelloAck = 2,
    /// Source → destination: guest memory bytes at an address.
    Memory = 3,
    /// Source → destination: ranges that are all zero (protocol ≥ 2).
    Zero = 4,
    /// Source → destination: end of a memory round.
    RoundEnd = 5,
    /// Source → destination: a piece of the encoded device-state tree.
    State = 6,
    /// Destination → source: state restored, ready to resume.
    Ready = 7,
    /// Source → destination: resume now (the commit point).
    Go = 8,
    /// Destination → source: resumed.
    Done = 9,
    /// Either way: the sender gives up, with a reason.
    Abort = 10,
    /// Source → destination (postcopy): pages still to come, instead of a final round.
    PostcopyPending = 11,
    /// Destination → source (postcopy): send these pages first, the guest waits on them.
    PageRequest = 12,
    /// Destination → source (postcopy): every pending page arrived.
    PostcopyComplete = 13,
    /// Source → destination (postcopy): first message of a new connection that
    /// continues an interrupted postcopy.
    Recover = 14,
    /// Destination → source (postcopy): the pages still missing, answering RECOVER.
    RecoverAck = 15,
    /// Destination → source, on the primary connection: the token secondary
    /// connections present, and the most connections allowed (multi-connection).
    Session = 25,
    /// Source → destination, on the primary connection: how many connections in all.
    Connections = 26,
    /// Source → destination, first frame of a secondary connection: the session token
    /// and the connection's index.
    Join = 27,
    /// Source → destination, on a secondary connection: its share of a round is sent.
    StripeEnd = 28,
}

impl MessageType {
    fn from_u16(v: u16) -> Option<Self> {
        use MessageType::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Memory,
            4 => Zero,
            5 => RoundEnd,
            6 => State,
            7 => Ready,
            8 => Go,
            9 => Done,
            10 => Abort,
            11 => PostcopyPending,
            12 => PageRequest,
            13 => PostcopyComplete,
            14 => Recover,
            15 => RecoverAck,
            25 => Session,
            26 => Connections,
            27 => Join,
            28 => StripeEnd,
            _ => return None,
        })
    }
}

/// What the source announces in its HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the source speaks.
    pub version: u32,
    /// Lowest protocol version the source speaks.
    pub min_version: u32,
    /// Architecture of the VM.
    pub arch: Arch,
    /// Codecs the source can encode state with, preferred first.
    pub codecs: Vec<CodecId>,
    /// Guest RAM layout.
    pub layout: Vec<MemoryRange>,
    /// Opaque VMM configuration the destination needs to build the VM (vCPU count…).
    pub config: Vec<u8>,
    /// Name and version of the producing software.
    pub producer: String,
    /// Optional features the source offers (`FEATURE_*` bits; on the wire since
    /// version 3, always 0 below it).
    pub features: u64,
}

/// A decoded message. Memory and state payloads borrow the frame buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`MessageType::Hello`].
    Hello(Hello),
    /// See [`MessageType::HelloAck`].
    HelloAck {
        /// Version both sides speak from now on.
        version: u32,
        /// Codec the source must encode state with.
        codec: CodecId,
        /// The offered features the destination accepts (on the wire since version 3).
        features: u64,
    },
    /// See [`MessageType::Memory`].
    Memory {
        /// Guest address of `data[0]`.
        gpa: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// See [`MessageType::Zero`].
    Zero(Vec<MemoryRange>),
    /// See [`MessageType::RoundEnd`].
    RoundEnd {
        /// Round number, from 0.
        round: u32,
        /// Whether this was the last round (the source is paused).
        last: bool,
    },
    /// See [`MessageType::State`].
    State {
        /// Whether this piece is the last.
        last: bool,
        /// The bytes.
        data: &'a [u8],
    },
    /// See [`MessageType::Ready`].
    Ready,
    /// See [`MessageType::Go`].
    Go,
    /// See [`MessageType::Done`].
    Done,
    /// See [`MessageType::Abort`].
    Abort(String),
    /// See [`MessageType::PostcopyPending`].
    PostcopyPending {
        /// Names this postcopy, for RECOVER.
        session: u64,
        /// Whether this frame ends the list.
        last: bool,
        /// Ranges of pages still to come.
        ranges: Vec<MemoryRange>,
    },
    /// See [`MessageType::PageRequest`]. Untrusted: the source checks it.
    PageRequest {
        /// Guest address of the first page.
        gpa: u64,
        /// Bytes asked for.
        length: u32,
    },
    /// See [`MessageType::PostcopyComplete`].
    PostcopyComplete,
    /// See [`MessageType::Recover`].
    Recover {
        /// The session of the interrupted postcopy.
        session: u64,
    },
    /// See [`MessageType::RecoverAck`].
    RecoverAck {
        /// Whether this frame ends the list.
        last: bool,
        /// Ranges of pages the destination still misses.
        ranges: Vec<MemoryRange>,
    },
    /// See [`MessageType::Session`].
    Session {
        /// Random token every secondary connection presents in its JOIN.
        token: [u8; SESSION_TOKEN_LEN],
        /// Most connections the destination accepts, the primary included (2 to
        /// [`MAX_CONNECTIONS`]).
        max_connections: u16,
    },
    /// See [`MessageType::Connections`]: connections in all, the primary included
    /// (1 to [`MAX_CONNECTIONS`]).
    Connections(u16),
    /// See [`MessageType::Join`].
    Join {
        /// The token of the SESSION message.
        token: [u8; SESSION_TOKEN_LEN],
        /// This connection's index (1 to CONNECTIONS − 1; the primary is 0).
        index: u16,
    },
    /// See [`MessageType::StripeEnd`].
    StripeEnd {
        /// Round number, from 0.
        round: u32,
        /// Whether this was the last round.
        last: bool,
    },
}

/// Errors of the migration protocol and its drivers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The connection failed (includes connect refused and early close).
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// A frame is malformed: bad header, length over the limit, bad field.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame's checksum does not match.
    #[error("checksum mismatch in a {0:?} frame")]
    Checksum(MessageType),
    /// The peer sent a message the state machine does not allow here.
    #[error("unexpected {got:?} message while {state}")]
    Unexpected {
        /// What arrived.
        got: MessageType,
        /// What this side was doing.
        state: &'static str,
    },
    /// The peer aborted, with its reason.
    #[error("peer aborted: {}", crate::text::printable(.0))]
    PeerAborted(String),
    /// This side rejected the handshake, for the reason given.
    #[error("handshake rejected: {0}")]
    Rejected(String),
    /// The destination answered the HELLO with ABORT: it refused the migration
    /// (a mismatch, a VM it could not build), for the reason it gave. Nothing was
    /// sent but the HELLO.
    #[error("destination refused: {}", crate::text::printable(.0))]
    Refused(String),
    /// Memory in a message lies outside the destination's RAM.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// A component failed (pause, snapshot, restore, dirty log…).
    #[error("VM: {0}")]
    Vm(#[from] MigratableError),
    /// The URL names no usable endpoint.
    #[error("endpoint: {0}")]
    Endpoint(#[source] Box<MigratableError>),
    /// Precopy did not converge and the policy is to cancel: why, in words, with the
    /// dirty rate and the link bandwidth.
    #[error("{0}")]
    NotConverged(Box<ConvergenceFailure>),
    /// The connection broke after the source sent GO: the destination may or may not
    /// have resumed. The source stays paused; the caller decides.
    #[error("connection lost at the commit point: the destination may be running; the source stays paused")]
    CommitUncertain,
    /// Postcopy: the connection to the source broke after the guest resumed here, and
    /// no recovery came in time. Pages of the guest that never arrived existed only on
    /// the source: **the guest is lost**.
    #[error("postcopy: the source is gone and the guest is lost ({})", crate::text::printable(.0))]
    GuestLost(String),
    /// The endpoint's security policy refused: plaintext where it is not allowed, a
    /// failed TLS handshake or authorization (the reason named). Nothing was sent.
    #[error("security: {0}")]
    Security(SecurityError),
}

impl From<SecurityError> for MigrationError {
    /// A socket failure stays [`MigrationError::Io`]; the rest is [`MigrationError::Security`].
    fn from(e: SecurityError) -> Self {
        match e {
            SecurityError::Io(e) => Self::Io(e),
            other => Self::Security(other),
        }
    }
}

impl MigrationError {
    pub(crate) fn endpoint(e: MigratableError) -> Self {
        Self::Endpoint(Box::new(e))
    }

    fn malformed(msg: impl Into<String>) -> Self {
        Self::Malformed(msg.into())
    }
}

fn crc64(parts: &[&[u8]]) -> u64 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    for p in parts {
        d.update(p);
    }
    d.finalize()
}

/// A little-endian cursor over an untrusted payload.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MigrationError> {
        if self.buf.len() < n {
            return Err(MigrationError::malformed("payload shorter than its fields"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], MigrationError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MigrationError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, MigrationError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count, checked against `max` and against the bytes left (`item` bytes each)
    /// before anything is allocated.
    fn count(
        &mut self,
        n: usize,
        max: usize,
        item: usize,
        what: &str,
    ) -> Result<usize, MigrationError> {
        if n > max {
            return Err(MigrationError::malformed(format!(
                "{n} {what}: over the limit {max}"
            )));
        }
        if n.saturating_mul(item) > self.buf.len() {
            return Err(MigrationError::malformed(format!(
                "{n} {what} do not fit the payload"
            )));
        }
        Ok(n)
    }
    fn text(&mut self, len: usize) -> Result<String, MigrationError> {
        let n = self.count(len, MAX_TEXT, 1, "text bytes")?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| MigrationError::malformed("text is not UTF-8"))
    }
    fn end(&self) -> Result<(), MigrationError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(MigrationError::malformed(format!(
                "{} trailing bytes in payload",
                self.buf.len()
            )))
        }
    }
}

fn flag(c: &mut Cursor<'_>, what: &str) -> Result<bool, MigrationError> {
    match c.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(MigrationError::malformed(format!("{what} = {v}"))),
    }
}

fn encode_ranges(out: &mut Vec<u8>, ranges: &[MemoryRange]) {
    out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.length.to_le_bytes());
    }
}

fn range(c: &mut Cursor<'_>) -> Result<MemoryRange, MigrationError> {
    let r = MemoryRange::new(c.u64()?, c.u64()?);
    if r.end().is_none() {
        return Err(MigrationError::malformed("memory range overflows u64"));
    }
    Ok(r)
}

impl<'a> Message<'a> {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloAck { .. } => MessageType::HelloAck,
            Message::Memory { .. } => MessageType::Memory,
            Message::Zero(_) => MessageType::Zero,
            Message::RoundEnd { .. } => MessageType::RoundEnd,
            Message::State { .. } => MessageType::State,
            Message::Ready => MessageType::Ready,
            Message::Go => MessageType::Go,
            Message::Done => MessageType::Done,
            Message::Abort(_) => MessageType::Abort,
            Message::PostcopyPending { .. } => MessageType::PostcopyPending,
            Message::PageRequest { .. } => MessageType::PageRequest,
            Message::PostcopyComplete => MessageType::PostcopyComplete,
            Message::Recover { .. } => MessageType::Recover,
            Message::RecoverAck { .. } => MessageType::RecoverAck,
            Message::Session { .. } => MessageType::Session,
            Message::Connections(_) => MessageType::Connections,
            Message::Join { .. } => MessageType::Join,
            Message::StripeEnd { .. } => MessageType::StripeEnd,
        }
    }

    /// Decodes the payload of a frame of type `ty`. The payload is untrusted.
    pub fn decode(ty: MessageType, payload: &'a [u8]) -> Result<Self, MigrationError> {
        let mut c = Cursor { buf: payload };
        let msg = match ty {
            MessageType::Hello => {
                if c.array::<8>()? != MAGIC {
                    return Err(MigrationError::malformed(
                        "bad HELLO magic: not a migration stream",
                    ));
                }
                let version = c.u32()?;
                let min_version = c.u32()?;
                let code = c.u32()?;
                let arch = Arch::from_code(code).ok_or_else(|| {
                    MigrationError::malformed(format!("unknown architecture code {code}"))
                })?;
                let n = c.u16()? as usize;
                let n = c.count(n, MAX_CODECS, 4, "codecs")?;
                let codecs = (0..n)
                    .map(|_| c.array::<4>().map(CodecId))
                    .collect::<Result<_, _>>()?;
                let n = c.u32()? as usize;
                let n = c.count(n, MAX_REGIONS, 16, "regions")?;
                let layout = (0..n).map(|_| range(&mut c)).collect::<Result<_, _>>()?;
                let n = c.u32()? as usize;
                let n = c.count(n, MAX_CONFIG, 1, "config bytes")?;
                let config = c.take(n)?.to_vec();
                let n = c.u16()? as usize;
                let producer = c.text(n)?;
                let features = if version >= FEATURES_SINCE {
                    c.u64()?
                } else {
                    0
                };
                if version > PROTOCOL_VERSION {
                    // A newer source may append fields this version does not know.
                    c.take(c.buf.len())?;
                }
                Message::Hello(Hello {
                    version,
                    min_version,
                    arch,
                    codecs,
                    layout,
                    config,
                    producer,
                    features,
                })
            }
            MessageType::HelloAck => {
                let version = c.u32()?;
                let codec = CodecId(c.array()?);
                let features = if version >= FEATURES_SINCE {
                    c.u64()?
                } else {
                    0
                };
                Message::HelloAck {
                    version,
                    codec,
                    features,
                }
            }
            MessageType::Memory => {
                let gpa = c.u64()?;
                let data = c.take(c.buf.len())?;
                if data.is_empty() || data.len() > MAX_MEMORY_CHUNK {
                    return Err(MigrationError::malformed(format!(
                        "memory chunk of {} bytes",
                        data.len()
                    )));
                }
                if gpa.checked_add(data.len() as u64).is_none() {
                    return Err(MigrationError::malformed("memory chunk overflows u64"));
                }
                Message::Memory { gpa, data }
            }
            MessageType::Zero => {
                let n = c.u32()? as usize;
                let n = c.count(n, MAX_ZERO_RANGES, 16, "zero ranges")?;
                Message::Zero((0..n).map(|_| range(&mut c)).collect::<Result<_, _>>()?)
            }
            MessageType::RoundEnd => {
                let round = c.u32()?;
                let last = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(MigrationError::malformed(format!("ROUND_END last = {v}"))),
                };
                Message::RoundEnd { round, last }
            }
            MessageType::StripeEnd => {
                let round = c.u32()?;
                let last = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(MigrationError::malformed(format!("STRIPE_END last = {v}"))),
                };
                Message::StripeEnd { round, last }
            }
            MessageType::Session => {
                let token = c.array()?;
                let max_connections = c.u16()?;
                if !(2..=MAX_CONNECTIONS).contains(&(max_connections as usize)) {
                    return Err(MigrationError::malformed(format!(
                        "SESSION allows {max_connections} connections (2 to {MAX_CONNECTIONS})"
                    )));
                }
                Message::Session {
                    token,
                    max_connections,
                }
            }
            MessageType::Connections => {
                let n = c.u16()?;
                if !(1..=MAX_CONNECTIONS).contains(&(n as usize)) {
                    return Err(MigrationError::malformed(format!(
                        "CONNECTIONS {n} (1 to {MAX_CONNECTIONS})"
                    )));
                }
                Message::Connections(n)
            }
            MessageType::Join => Message::Join {
                token: c.array()?,
                index: c.u16()?,
            },
            MessageType::State => {
                let last = match c.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(MigrationError::malformed(format!("STATE last = {v}"))),
                };
                Message::State {
                    last,
                    data: c.take(c.buf.len())?,
                }
            }
            MessageType::Ready => Message::Ready,
            MessageType::Go => Message::Go,
            MessageType::Done => Message::Done,
            MessageType::Abort => {
                let n = c.u16()? as usize;
                Message::Abort(c.text(n)?)
            }
            MessageType::PostcopyPending => {
                let session = c.u64()?;
                let last = flag(&mut c, "POSTCOPY_PENDING last")?;
                let n = c.u32()? as usize;
                let n = c.count(n, MAX_PENDING_RANGES, 16, "pending ranges")?;
                let ranges = (0..n).map(|_| range(&mut c)).collect::<Result<_, _>>()?;
                Message::PostcopyPending {
                    session,
                    last,
                    ranges,
                }
            }
            MessageType::PageRequest => Message::PageRequest {
                gpa: c.u64()?,
                length: c.u32()?,
            },
            MessageType::PostcopyComplete => Message::PostcopyComplete,
            MessageType::Recover => Message::Recover { session: c.u64()? },
            MessageType::RecoverAck => {
                let last = flag(&mut c, "RECOVER_ACK last")?;
                let n = c.u32()? as usize;
                let n = c.count(n, MAX_PENDING_RANGES, 16, "missing ranges")?;
                let ranges = (0..n).map(|_| range(&mut c)).collect::<Result<_, _>>()?;
                Message::RecoverAck { last, ranges }
            }
        };
        c.end()?;
        Ok(msg)
    }

    /// Appends the payload encoding to `out` (for MEMORY and STATE, only the part
    /// before the data: the data follows separately, see [`Channel::send`]).
    fn encode_head(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.min_version.to_le_bytes());
                out.extend_from_slice(&h.arch.code().to_le_bytes());
                out.extend_from_slice(&(h.codecs.len() as u16).to_le_bytes());
                for c in &h.codecs {
                    out.extend_from_slice(&c.0);
                }
                out.extend_from_slice(&(h.layout.len() as u32).to_le_bytes());
                for r in &h.layout {
                    out.extend_from_slice(&r.gpa.to_le_bytes());
                    out.extend_from_slice(&r.length.to_le_bytes());
                }
                out.extend_from_slice(&(h.config.len() as u32).to_le_bytes());
                out.extend_from_slice(&h.config);
                out.extend_from_slice(&(h.producer.len() as u16).to_le_bytes());
                out.extend_from_slice(h.producer.as_bytes());
                if h.version >= FEATURES_SINCE {
                    out.extend_from_slice(&h.features.to_le_bytes());
                }
            }
            Message::HelloAck {
                version,
                codec,
                features,
            } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&codec.0);
                if *version >= FEATURES_SINCE {
                    out.extend_from_slice(&features.to_le_bytes());
                }
            }
            Message::Memory { gpa, .. } => out.extend_from_slice(&gpa.to_le_bytes()),
            Message::Zero(ranges) => {
                out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for r in ranges {
                    out.extend_from_slice(&r.gpa.to_le_bytes());
                    out.extend_from_slice(&r.length.to_le_bytes());
                }
            }
            Message::RoundEnd { round, last } | Message::StripeEnd { round, last } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.push(u8::from(*last));
            }
            Message::Session {
                token,
                max_connections,
            } => {
                out.extend_from_slice(token);
                out.extend_from_slice(&max_connections.to_le_bytes());
            }
            Message::Connections(n) => out.extend_from_slice(&n.to_le_bytes()),
            Message::Join { token, index } => {
                out.extend_from_slice(token);
                out.extend_from_slice(&index.to_le_bytes());
            }
            Message::State { last, .. } => out.push(u8::from(*last)),
            Message::Ready | Message::Go | Message::Done | Message::PostcopyComplete => {}
            Message::PostcopyPending {
                session,
                last,
                ranges,
            } => {
                out.extend_from_slice(&session.to_le_bytes());
                out.push(u8::from(*last));
                encode_ranges(out, ranges);
            }
            Message::PageRequest { gpa, length } => {
                out.extend_from_slice(&gpa.to_le_bytes());
                out.extend_from_slice(&length.to_le_bytes());
            }
            Message::Recover { session } => out.extend_from_slice(&session.to_le_bytes()),
            Message::RecoverAck { last, ranges } => {
                out.push(u8::from(*last));
                encode_ranges(out, ranges);
            }
            Message::Abort(reason) => {
                let mut end = reason.len().min(MAX_TEXT);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&(end as u16).to_le_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Message::Memory { data, .. } | Message::State { data, .. } => data,
            _ => &[],
        }
    }
}

/// What [`Channel::recv_into`] received.
#[derive(Debug, PartialEq)]
pub enum Received<'a> {
    /// A MEMORY frame whose data was written into the sink and checked: its range.
    MemoryWritten(MemoryRange),
    /// Any other message, decoded.
    Message(Message<'a>),
}

/// Passes reads through and feeds every byte read to a CRC.
struct CrcReader<'a, R: Read> {
    inner: &'a mut R,
    digest: &'a mut crc_fast::Digest,
}

impl<R: Read> Read for CrcReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
}

/// The socket under a stream, if MEMORY data may be read from it directly
/// ([`Channel::with_socket`]).
pub type SocketOf<S> = fn(&S) -> Option<BorrowedFd<'_>>;

/// One end of a migration connection: frames messages out, checks and decodes
/// messages in. Small frames are buffered until [`flush`](Channel::flush) or until a
/// reply is awaited.
#[derive(Debug)]
pub struct Channel<S: Read + Write> {
    io: BufReader<Deadline<S>>,
    /// Where [`recv_into`](Channel::recv_into) may read MEMORY data from directly.
    socket: Option<SocketOf<S>>,
    out: Vec<u8>,
    frame: Vec<u8>,
    bytes_sent: u64,
    /// Time allowed for each incoming frame, from its first byte read attempt.
    frame_timeout: Option<Duration>,
    /// No frame may end after this.
    overall: Option<Instant>,
}

const OUT_FLUSH: usize = 256 << 10;

impl<S: Read + Write> Channel<S> {
    /// A channel over a connected stream.
    pub fn new(stream: S) -> Self {
        Self {
            io: BufReader::with_capacity(256 << 10, Deadline::new(stream)),
            socket: None,
            out: Vec::with_capacity(OUT_FLUSH + 4096),
            frame: Vec::new(),
            bytes_sent: 0,
            frame_timeout: None,
            overall: None,
        }
    }

    /// Lets [`recv_into`](Channel::recv_into) read MEMORY data from the socket
    /// `socket_of` finds under the stream (`None` for a stream that is not a plain
    /// socket, such as TLS), straight into a sink that can
    /// ([`MemorySink::read_memory_from_fd`]). The stream must not buffer or transform
    /// what it reads from that socket.
    pub fn with_socket(mut self, socket_of: SocketOf<S>) -> Self {
        self.socket = Some(socket_of);
        self
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.io.get_ref().get_ref()
    }

    /// Each incoming frame must arrive whole within `timeout` of the moment it is
    /// awaited (`None`: no limit). Unlike a socket's read timeout, this catches a peer
    /// that sends one byte at a time.
    pub fn set_frame_timeout(&mut self, timeout: Option<Duration>) {
        self.frame_timeout = timeout;
    }

    /// No incoming frame may end after `at` (`None`: no limit): a whole exchange's
    /// deadline.
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.overall = at;
    }

    /// Arms the deadline of the next frame.
    fn start_frame(&mut self) {
        let frame = self
            .frame_timeout
            .and_then(|t| Instant::now().checked_add(t));
        let at = match (frame, self.overall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.io.get_mut().set(at);
    }

    /// Bytes framed so far (headers, payloads, checksums).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Frames and queues `msg`; large payloads are written straight through.
    pub fn send(&mut self, msg: &Message<'_>) -> Result<(), MigrationError> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0u8; HEADER]);
        msg.encode_head(&mut self.out);
        let data = msg.data();
        let len = self.out.len() - start - HEADER + data.len();
        if len > MAX_PAYLOAD as usize {
            self.out.truncate(start);
            return Err(MigrationError::malformed(format!(
                "payload of {len} bytes over MAX_PAYLOAD"
            )));
        }
        let ty = msg.message_type() as u16;
        self.out[start..start + 2].copy_from_slice(&ty.to_le_bytes());
        self.out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc64(&[&self.out[start..], data]);
        if data.len() > 64 << 10 {
            self.flush_buffer()?;
            self.io.get_mut().write_all(data)?;
        } else {
            self.out.extend_from_slice(data);
        }
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.bytes_sent += (HEADER + len + TRAILER) as u64;
        if self.out.len() >= OUT_FLUSH {
            self.flush_buffer()?;
        }
        Ok(())
    }

    /// Writes the queued frames. On failure they are dropped too: part of them may be
    /// on the wire, so resending them (say, in front of an ABORT) would send garbage.
    fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let written = self.io.get_mut().write_all(&self.out);
            self.out.clear();
            written?;
        }
        Ok(())
    }

    /// Writes out everything queued.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.flush_buffer()?;
        self.io.get_mut().flush()?;
        Ok(())
    }

    /// Reads, checks and decodes the next message. An ABORT from the peer is returned
    /// as a message; the caller turns it into [`MigrationError::PeerAborted`].
    pub fn recv(&mut self) -> Result<Message<'_>, MigrationError> {
        let (header, ty, len) = self.read_header()?;
        self.read_payload(header, ty, len)
    }

    /// Reads and checks a frame header: type known, flags zero, length bounded.
    fn read_header(&mut self) -> Result<([u8; HEADER], MessageType, u32), MigrationError> {
        self.flush()?;
        self.start_frame();
        let mut header = [0u8; HEADER];
        self.io.read_exact(&mut header)?;
        let ty_raw = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let ty = MessageType::from_u16(ty_raw)
            .ok_or_else(|| MigrationError::malformed(format!("unknown message type {ty_raw}")))?;
        if flags != 0 {
            return Err(MigrationError::malformed(format!(
                "flags {flags:#x} set in a {ty:?} frame"
            )));
        }
        if len > MAX_PAYLOAD {
            return Err(MigrationError::malformed(format!(
                "{ty:?} payload of {len} bytes over MAX_PAYLOAD"
            )));
        }
        Ok((header, ty, len))
    }

    /// Like [`recv`](Channel::recv), but the data of a MEMORY frame goes from the
    /// stream straight into `sink` ([`MemorySink::read_memory_from`]) with the checksum
    /// computed on the way, instead of through the frame buffer. The frame's range is
    /// checked against `layout` before a byte is written. A checksum mismatch is
    /// detected only after the bytes landed: the caller must then discard the VM (the
    /// destination does: it aborts and drops it, and never resumed it).
    pub fn recv_into(
        &mut self,
        sink: &dyn MemorySink,
        layout: &[MemoryRange],
    ) -> Result<Received<'_>, MigrationError> {
        let (header, ty, len) = self.read_header()?;
        if ty != MessageType::Memory || (len as usize) <= 8 {
            return self.read_payload(header, ty, len).map(Received::Message);
        }
        let mut gpa = [0u8; 8];
        self.io.read_exact(&mut gpa)?;
        let data_len = len as usize - 8;
        if data_len > MAX_MEMORY_CHUNK {
            return Err(MigrationError::malformed(format!(
                "memory chunk of {data_len} bytes"
            )));
        }
        let range = MemoryRange::new(u64::from_le_bytes(gpa), data_len as u64);
        if range.end().is_none() {
            return Err(MigrationError::malformed("memory chunk overflows u64"));
        }
        check_range(layout, range)?;
        let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
        digest.update(&header);
        digest.update(&gpa);
        let memory_error = |e| match e {
            MemoryError::Io(e) => MigrationError::Io(e),
            other => MigrationError::Memory(other),
        };
        let mut done = 0u64;
        if let Some(socket_of) = self.socket {
            // What the buffer holds already goes in by copy; the rest comes from the
            // socket straight into guest memory, checksummed where it landed.
            let buffered = self.io.buffer();
            let n = buffered.len().min(data_len);
            if n > 0 {
                sink.write_memory(range.gpa, &buffered[..n])
                    .map_err(memory_error)?;
                digest.update(&buffered[..n]);
                self.io.consume(n);
                done = n as u64;
            }
            let io = self.io.get_ref();
            if let Some(fd) = (socket_of)(io.get_ref()).filter(|_| done < range.length) {
                let mut landed = |bytes: &[u8]| {
                    digest.update(bytes);
                    io.check()
                };
                if sink
                    .read_memory_from_fd(range.gpa + done, range.length - done, fd, &mut landed)
                    .map_err(memory_error)?
                {
                    done = range.length;
                }
            }
        }
        if done < range.length {
            let mut reader = CrcReader {
                inner: &mut self.io,
                digest: &mut digest,
            };
            sink.read_memory_from(range.gpa + done, range.length - done, &mut reader)
                .map_err(memory_error)?;
        }
        let mut crc = [0u8; TRAILER];
        self.io.read_exact(&mut crc)?;
        if digest.finalize() != u64::from_le_bytes(crc) {
            return Err(MigrationError::Checksum(ty));
        }
        Ok(Received::MemoryWritten(range))
    }

    /// Reads the payload and trailer of a frame whose header was checked, verifies the
    /// checksum and decodes the message.
    fn read_payload(
        &mut self,
        header: [u8; HEADER],
        ty: MessageType,
        len: u32,
    ) -> Result<Message<'_>, MigrationError> {
        // Bounded by MAX_PAYLOAD in read_header, and grown only as bytes arrive (a
        // header alone reserves nothing); the buffer is reused across frames.
        let want = len as usize + TRAILER;
        self.frame.clear();
        (&mut self.io)
            .take(want as u64)
            .read_to_end(&mut self.frame)?;
        if self.frame.len() < want {
            return Err(MigrationError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed inside a {ty:?} frame"),
            )));
        }
        let (payload, trailer) = self.frame.split_at(len as usize);
        let mut crc = [0u8; 8];
        crc.copy_from_slice(trailer);
        if crc64(&[&header, payload]) != u64::from_le_bytes(crc) {
            return Err(MigrationError::Checksum(ty));
        }
        Message::decode(ty, payload)
    }

    /// Sends ABORT with `reason`, ignoring failures (the connection may be gone).
    pub fn abort(&mut self, reason: &str) {
        let _ = self
            .send(&Message::Abort(reason.to_owned()))
            .and_then(|_| self.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Message<'_>) {
        let mut ch = Channel::new(io::Cursor::new(Vec::new()));
        ch.send(&msg).unwrap();
        ch.flush().unwrap();
        let bytes = ch.io.into_inner().into_inner().into_inner();
        let mut rx = Channel::new(io::Cursor::new(bytes));
        assert_eq!(rx.recv().unwrap(), msg);
    }

    struct VecSink(std::sync::Mutex<Vec<u8>>);

    impl MemorySink for VecSink {
        fn regions(&self) -> Vec<MemoryRange> {
            vec![MemoryRange::new(0x1000, 0x10000)]
        }
        fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
            let at = (gpa - 0x1000) as usize;
            self.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn memory_frame(gpa: u64, data: &[u8]) -> Vec<u8> {
        let mut ch = Channel::new(io::Cursor::new(Vec::new()));
        ch.send(&Message::Memory { gpa, data }).unwrap();
        ch.send(&Message::Ready).unwrap();
        ch.flush().unwrap();
        ch.io.into_inner().into_inner().into_inner()
    }

    #[test]
    fn recv_into_streams_memory_and_checks_it() {
        let sink = VecSink(std::sync::Mutex::new(vec![0; 0x10000]));
        let layout = sink.regions();
        let data: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8 + 1).collect();
        let bytes = memory_frame(0x2000, &data);
        let mut rx = Channel::new(io::Cursor::new(bytes.clone()));
        assert_eq!(
            rx.recv_into(&sink, &layout).unwrap(),
            Received::MemoryWritten(MemoryRange::new(0x2000, 0x3000))
        );
        assert_eq!(&sink.0.lock().unwrap()[0x1000..0x4000], &data[..]);
        // The next frame is intact and decoded normally.
        assert_eq!(
            rx.recv_into(&sink, &layout).unwrap(),
            Received::Message(Message::Ready)
        );

        // A flipped data byte: the checksum catches it after the write.
        let mut bad = bytes.clone();
        bad[HEADER + 8 + 100] ^= 4;
        let mut rx = Channel::new(io::Cursor::new(bad));
        assert!(matches!(
            rx.recv_into(&sink, &layout),
            Err(MigrationError::Checksum(MessageType::Memory))
        ));

        // Outside the layout: rejected before any byte is written.
        let fresh = VecSink(std::sync::Mutex::new(vec![0; 0x10000]));
        let mut rx = Channel::new(io::Cursor::new(memory_frame(0x10000, &data)));
        assert!(matches!(
            rx.recv_into(&fresh, &layout),
            Err(MigrationError::Memory(_))
        ));
        assert!(fresh.0.lock().unwrap().iter().all(|&b| b == 0));

        // Truncated data: an I/O error, as from recv.
        let mut rx = Channel::new(io::Cursor::new(bytes[..HEADER + 8 + 10].to_vec()));
        assert!(matches!(
            rx.recv_into(&sink, &layout),
            Err(MigrationError::Io(_))
        ));
    }

    #[test]
    fn every_message_round_trips() {
        let data = vec![7u8; 100_000];
        round_trip(Message::Hello(Hello {
            version: 2,
            min_version: 1,
            arch: Arch::X86_64,
            codecs: vec![CodecId::new(b"pcd1"), CodecId::new(b"json")],
            layout: vec![
                MemoryRange::new(0, 1 << 20),
                MemoryRange::new(1 << 32, 4096),
            ],
            config: b"vcpus=2".to_vec(),
            producer: "test 1.0".into(),
            features: 0,
        }));
        round_trip(Message::Hello(Hello {
            version: 3,
            min_version: 1,
            arch: Arch::X86_64,
            codecs: vec![CodecId::new(b"pcd1")],
            layout: vec![MemoryRange::new(0, 1 << 20)],
            config: Vec::new(),
            producer: "test 1.1".into(),
            features: FEATURE_POSTCOPY | (1 << 40),
        }));
        round_trip(Message::HelloAck {
            version: 2,
            codec: CodecId::new(b"json"),
            features: 0,
        });
        round_trip(Message::HelloAck {
            version: 3,
            codec: CodecId::new(b"json"),
            features: FEATURE_MULTI_CONNECTION,
        });
        round_trip(Message::Memory {
            gpa: 0x1000,
            data: &data,
        });
        round_trip(Message::Zero(vec![MemoryRange::new(0, 4096)]));
        round_trip(Message::RoundEnd {
            round: 3,
            last: true,
        });
        round_trip(Message::State {
            last: false,
            data: b"abc",
        });
        round_trip(Message::Ready);
        round_trip(Message::Go);
        round_trip(Message::Done);
        round_trip(Message::Abort("no room".into()));
        round_trip(Message::PostcopyPending {
            session: 7,
            last: true,
            ranges: vec![MemoryRange::new(0x1000, 0x3000)],
        });
        round_trip(Message::PageRequest {
            gpa: 0x5000,
            length: 4096,
        });
        round_trip(Message::PostcopyComplete);
        round_trip(Message::Recover { session: 7 });
        round_trip(Message::RecoverAck {
            last: false,
            ranges: vec![MemoryRange::new(0, 4096)],
        });
        round_trip(Message::Session {
            token: [7; SESSION_TOKEN_LEN],
            max_connections: 4,
        });
        round_trip(Message::Connections(3));
        round_trip(Message::Join {
            token: [9; SESSION_TOKEN_LEN],
            index: 2,
        });
        round_trip(Message::StripeEnd {
            round: 4,
            last: false,
        });
    }

    fn hello_bytes(version: u32, features: u64) -> Vec<u8> {
        let mut head = Vec::new();
        Message::Hello(Hello {
            version,
            min_version: 1,
            arch: Arch::X86_64,
            codecs: vec![CodecId::new(b"json")],
            layout: vec![MemoryRange::new(0, 4096)],
            config: Vec::new(),
            producer: "p".into(),
            features,
        })
        .encode_head(&mut head);
        head
    }

    #[test]
    fn feature_bits_travel_from_version_3_only() {
        // Below version 3 the field is not on the wire: a version-2 peer reads the
        // HELLO it always did, and the features read back as none.
        let v2 = hello_bytes(2, FEATURE_POSTCOPY);
        assert_eq!(v2.len() + 8, hello_bytes(3, FEATURE_POSTCOPY).len());
        match Message::decode(MessageType::Hello, &v2).unwrap() {
            Message::Hello(h) => assert_eq!(h.features, 0),
            other => panic!("{other:?}"),
        }
        // A version-3 HELLO without its features is truncated.
        let v3 = hello_bytes(3, FEATURE_POSTCOPY);
        assert!(matches!(
            Message::decode(MessageType::Hello, &v3[..v3.len() - 8]),
            Err(MigrationError::Malformed(_))
        ));
        // A newer source may append fields: they are skipped, the features kept.
        let mut v9 = hello_bytes(9, FEATURE_LOCAL_MEMORY);
        v9.extend_from_slice(b"future fields");
        match Message::decode(MessageType::Hello, &v9).unwrap() {
            Message::Hello(h) => assert_eq!((h.version, h.features), (9, FEATURE_LOCAL_MEMORY)),
            other => panic!("{other:?}"),
        }
        // The current version still refuses trailing bytes.
        let mut v3 = v3;
        v3.push(0);
        assert!(Message::decode(MessageType::Hello, &v3).is_err());
    }

    #[test]
    fn forged_counts_are_rejected_before_allocation() {
        // A ZERO frame claiming 4 billion ranges in 4 bytes.
        let payload = u32::MAX.to_le_bytes();
        assert!(matches!(
            Message::decode(MessageType::Zero, &payload),
            Err(MigrationError::Malformed(_))
        ));
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&[2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
        hello.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(Message::decode(MessageType::Hello, &hello).is_err());
    }

    #[test]
    fn hello_architecture_codes_are_the_containers() {
        let hello = |arch: Arch| {
            let mut out = Vec::new();
            Message::Hello(Hello {
                version: 2,
                min_version: 1,
                arch,
                codecs: vec![],
                layout: vec![],
                config: vec![],
                producer: String::new(),
                features: 0,
            })
            .encode_head(&mut out);
            out
        };
        for arch in [Arch::None, Arch::X86_64, Arch::Aarch64, Arch::Riscv64] {
            let bytes = hello(arch);
            assert_eq!(bytes[16..20], arch.code().to_le_bytes());
            match Message::decode(MessageType::Hello, &bytes) {
                Ok(Message::Hello(h)) => assert_eq!(h.arch, arch),
                other => panic!("{arch:?}: {other:?}"),
            }
        }
        // A code no architecture has is a malformed HELLO.
        let mut bytes = hello(Arch::X86_64);
        bytes[16..20].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Message::decode(MessageType::Hello, &bytes),
            Err(MigrationError::Malformed(m)) if m.contains("architecture code 99")
        ));
    }

    /// A header declaring MAX_PAYLOAD, then a few bytes and the end: the frame buffer
    /// grew only by what arrived (8 MiB were not reserved up front).
    #[test]
    fn a_frame_header_alone_reserves_nothing() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(MessageType::State as u16).to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
        bytes.extend_from_slice(&[1u8; 100]);
        let mut ch = Channel::new(io::Cursor::new(bytes));
        assert!(matches!(ch.recv(), Err(MigrationError::Io(_))));
        assert!(ch.frame.capacity() < 1 << 20, "{}", ch.frame.capacity());
    }

    #[test]
    fn corrupt_frames_are_typed_errors() {
        let mut ch = Channel::new(io::Cursor::new(Vec::new()));
        ch.send(&Message::RoundEnd {
            round: 1,
            last: false,
        })
        .unwrap();
        ch.flush().unwrap();
        let good = ch.io.into_inner().into_inner().into_inner();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut rx = Channel::new(io::Cursor::new(bad));
            assert!(rx.recv().is_err(), "bit {bit} flip accepted");
        }
        for cut in 0..good.len() {
            let mut rx = Channel::new(io::Cursor::new(good[..cut].to_vec()));
            assert!(rx.recv().is_err(), "truncation at {cut} accepted");
        }
    }
}
