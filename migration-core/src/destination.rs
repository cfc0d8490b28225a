//! The receiving side of a live migration: accept a HELLO, build the VM, write memory
//! rounds into it, restore its state and resume it on GO.
//!
//! Every address is checked against the destination VM's own layout before a byte is
//! written. On any error the destination sends ABORT with the reason and drops the VM
//! it built.

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arch::Arch;
use crate::codec::{self, Codec, CodecRegistry};
use crate::endpoint::{Endpoint, Stream};
use crate::error::MigratableError;
use crate::memory::{check_range, MemoryRange, MemorySink};
use crate::migratable::{Migratable, MigrationRole};
use crate::multi::{self, Acceptor, Barrier, BoxedConnection, DEFAULT_MAX_CONNECTIONS};
use crate::protocol::{
    Channel, Hello, Message, MessageType, MigrationError, Received, FEATURES_SINCE,
    FEATURE_MULTI_CONNECTION, KNOWN_FEATURES, MAX_STATE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::security::Security;
use crate::snapshot::Snapshot;

/// What the destination learns from the source's HELLO: enough to build the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingVm {
    /// Protocol version both sides will speak.
    pub version: u32,
    /// Architecture of the VM.
    pub arch: Arch,
    /// Guest RAM layout the new VM must have.
    pub layout: Vec<MemoryRange>,
    /// The source's opaque VMM configuration.
    pub config: Vec<u8>,
    /// The source's producer string.
    pub producer: String,
    /// Optional features both sides agreed on (`FEATURE_*` bits of
    /// [`protocol`](crate::protocol); 0 below protocol version 3).
    pub features: u64,
}

/// Options of [`receive_migration_over`]: what this destination accepts, and how long
/// it waits. [`ReceiveOptions::new`] gives the defaults below.
#[derive(Clone)]
#[non_exhaustive]
pub struct ReceiveOptions {
    /// Architecture this destination runs (a HELLO for another one is rejected).
    pub arch: Arch,
    /// Codecs this destination can decode state with.
    pub codecs: CodecRegistry,
    /// Most guest RAM a HELLO may declare: above it the HELLO is rejected before the
    /// VM is built (no memory or kernel object is committed for it). Default: this
    /// host's physical RAM.
    pub max_guest_ram: u64,
    /// The HELLO must arrive whole within this time of the connection (default 10 s).
    pub handshake_timeout: Duration,
    /// Every later frame must arrive whole within this time of being awaited
    /// (default 60 s; a frame is at most 8 MiB). Unlike a socket's read timeout,
    /// this ends a peer that sends one byte at a time.
    pub frame_timeout: Duration,
    /// The whole migration must end within this time (default: no limit).
    pub max_time: Option<Duration>,
    /// Optional features (`FEATURE_*` bits of [`protocol`](crate::protocol)) this
    /// destination accepts when a source offers them (default: none).
    pub features: u64,
    /// Most connections a source may carry guest memory over, the first included,
    /// when [`FEATURE_MULTI_CONNECTION`] is enabled in `features` (default
    /// [`DEFAULT_MAX_CONNECTIONS`], at most [`MAX_CONNECTIONS`](crate::protocol::MAX_CONNECTIONS));
    /// 1 refuses the feature ([`crate::multi`]).
    pub max_connections: usize,
}

/// Default [`ReceiveOptions::handshake_timeout`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ReceiveOptions::frame_timeout`].
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

impl ReceiveOptions {
    /// Options for a destination running `arch` with `codecs`, and the default limits.
    pub fn new(arch: Arch, codecs: CodecRegistry) -> Self {
        Self {
            arch,
            codecs,
            max_guest_ram: host_ram(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            frame_timeout: FRAME_TIMEOUT,
            max_time: None,
            features: 0,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// This host's physical RAM (4 TiB if the kernel does not say).
pub fn host_ram() -> u64 {
    let info = rustix::system::sysinfo();
    let ram = info
        .totalram
        .saturating_mul(u64::from(info.mem_unit).max(1));
    if ram == 0 {
        4 << 40
    } else {
        ram
    }
}

impl fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("arch", &self.arch)
            .field("codecs", &self.codecs)
            .field("max_guest_ram", &self.max_guest_ram)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("frame_timeout", &self.frame_timeout)
            .field("max_time", &self.max_time)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// What the destination received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Memory rounds received.
    pub rounds: u32,
    /// Bytes of guest memory written from MEMORY frames.
    pub memory_bytes: u64,
    /// Bytes covered by ZERO ranges.
    pub zero_bytes: u64,
    /// Size of the encoded device state.
    pub state_bytes: u64,
}

/// Receives a migration over a connected `stream`. `build` makes the VM from what the
/// HELLO announced (its memory must read as zero); its error is sent to the source
/// as the ABORT reason. Returns the running VM.
pub fn receive_migration_over<M, S, F>(
    stream: S,
    options: &ReceiveOptions,
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    S: Read + Write,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    receive_over(Channel::new(stream), None, options, build)
}

/// [`receive_migration_over`] that can accept more connections: if the source asks
/// for several (and [`ReceiveOptions::max_connections`] allows), `accept` is called
/// for each, with the deadline by which it must have connected, and guest memory
/// arrives over all of them ([`crate::multi`]). The source side is
/// [`send_migration_over_connections`](crate::precopy::send_migration_over_connections).
pub fn receive_migration_over_connections<M, S, C, F>(
    stream: S,
    mut accept: impl FnMut(Instant) -> std::io::Result<C>,
    options: &ReceiveOptions,
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    S: Read + Write,
    C: multi::Connection + 'static,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let mut accept = |deadline: Instant| -> Result<BoxedConnection, MigrationError> {
        Ok(Box::new(accept(deadline)?))
    };
    receive_over(Channel::new(stream), Some(&mut accept), options, build)
}

/// The receiving side on a channel set up by the caller (with its socket, for reads
/// straight into guest memory), accepting more connections through `accept` if given.
fn receive_over<M, S, F>(
    mut ch: Channel<S>,
    accept: Option<&mut Acceptor<'_>>,
    options: &ReceiveOptions,
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    S: Read + Write,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let _span = tracing::info_span!("migrate_in").entered();
    match receive(&mut ch, accept, options, build) {
        Ok(done) => Ok(done),
        Err(e) => {
            // `?`: the error may quote the peer's reason (untrusted text).
            tracing::warn!(error = ?e.to_string(), "incoming migration aborted");
            abort(&mut ch, &e);
            Err(e)
        }
    }
}

/// Tells the source why this destination gives up (not if the source gave up first).
fn abort<S: Read + Write>(ch: &mut Channel<S>, e: &MigrationError) {
    match e {
        MigrationError::PeerAborted(_) => {}
        // The answer to the HELLO: the source says who refused.
        MigrationError::Rejected(reason) => ch.abort(reason),
        other => ch.abort(&format!("destination: {other}")),
    }
}

/// Listens at `url` (`tcp://host:port` on a loopback address, or `unix:///path`),
/// accepts one source and receives its VM; for `tls://` or a non-loopback address use
/// [`receive_migration_with`]. See [`receive_migration_over`]. `on_listen` is called with the
/// URL to connect to once the socket listens (with the real port for `tcp://…:0`).
pub fn receive_migration<M, F>(
    url: &str,
    options: &ReceiveOptions,
    io_timeout: Duration,
    on_listen: impl FnOnce(&str),
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    receive_migration_with(
        url,
        &Security::plaintext(),
        options,
        io_timeout,
        on_listen,
        build,
    )
}

/// [`receive_migration`] under `security`: `tls://host:port` with TLS credentials, or
/// plaintext `tcp://` on a non-loopback address with [`Security::insecure`]. The TLS
/// handshake and the source's authorization complete before the HELLO is read: a
/// refused source costs no VM (`build` is not called) and gets the reason (a TLS
/// alert, or an ABORT if it spoke plaintext).
pub fn receive_migration_with<M, F>(
    url: &str,
    security: &Security,
    options: &ReceiveOptions,
    io_timeout: Duration,
    on_listen: impl FnOnce(&str),
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let listener = Endpoint::parse(url)
        .map_err(MigrationError::endpoint)?
        .bind_with(security)?;
    on_listen(&listener.url()?);
    let mut build = Some(build);
    loop {
        // A peer that TLS refuses (or a plaintext one on a TLS listener) ends the
        // receive with the reason; see docs/security.md.
        let stream = listener
            .accept_with(security, Some(io_timeout), |plain, e| {
                // A plaintext source reads an ABORT in its own protocol.
                Channel::new(plain).abort(&format!("destination: {e}"))
            })
            .inspect_err(|e| tracing::warn!(error = %e, "incoming migration refused"))?;
        let mut once = |incoming: &IncomingVm| match build.take() {
            Some(b) => b(incoming),
            None => Err(MigratableError::Build(
                "the VM was built once already".into(),
            )),
        };
        // tcp:// and unix://: MEMORY data straight from the socket into guest memory
        // (where the VM's memory can take it).
        let ch = Channel::new(stream).with_socket(Stream::socket);
        let mut accept_more = |deadline: Instant| {
            multi::accept_until(&listener, security, Some(io_timeout), deadline)
        };
        match receive_over(ch, Some(&mut accept_more), options, &mut once) {
            // A connection that sent no complete HELLO in time (slow, silent, gone)
            // is dropped and the next one served: waiting sources queue in the
            // listen backlog meanwhile, and none is held longer than the handshake
            // timeout.
            Err(MigrationError::Io(e)) if build.is_some() => {
                tracing::warn!(error = ?e.to_string(), "connection without a HELLO dropped; accepting the next one");
            }
            other => return other,
        }
    }
}

/// Builds the VM an accepted HELLO describes with the caller's `build`, checks it
/// has the announced layout, and tells it it is a migration's destination. A build
/// error is the refusal the source reads.
pub(crate) fn build_incoming<M, F>(incoming: &IncomingVm, build: F) -> Result<M, MigrationError>
where
    M: Migratable,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let mut vm = build(incoming).map_err(|e| {
        // Said once: `Build` reads "cannot build the VM: …" already.
        let e = match e {
            MigratableError::Build(_) => e,
            other => MigratableError::Build(Box::new(other)),
        };
        MigrationError::Rejected(e.to_string())
    })?;
    let layout = vm.memory_sink().regions();
    if layout != incoming.layout {
        return Err(MigrationError::Rejected(format!(
            "memory layout mismatch: source {:x?}, destination built {:x?}",
            incoming.layout, layout
        )));
    }
    vm.start_migration(MigrationRole::Destination)?;
    Ok(vm)
}

/// What the handshake settled: protocol version, codec and feature bits.
pub(crate) struct Negotiated {
    pub(crate) version: u32,
    pub(crate) codec: Arc<dyn Codec>,
    pub(crate) features: u64,
}

pub(crate) fn negotiate(
    hello: &Hello,
    options: &ReceiveOptions,
) -> Result<Negotiated, MigrationError> {
    let version = hello.version.min(PROTOCOL_VERSION);
    if version < hello.min_version.max(MIN_PROTOCOL_VERSION) {
        return Err(MigrationError::Rejected(format!(
            "protocol versions do not overlap: source speaks {} to {}, destination {} to {}",
            hello.min_version, hello.version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
        )));
    }
    if hello.arch != options.arch {
        return Err(MigrationError::Rejected(format!(
            "architecture mismatch: source VM is {:?}, destination runs {:?}",
            hello.arch, options.arch
        )));
    }
    let codec = hello
        .codecs
        .iter()
        .find_map(|id| options.codecs.get(*id))
        .cloned()
        .ok_or_else(|| {
            let ours: Vec<String> = options.codecs.iter().map(|c| c.id().to_string()).collect();
            let theirs: Vec<String> = hello.codecs.iter().map(|c| c.to_string()).collect();
            MigrationError::Rejected(format!(
                "no common codec: source offers [{}], destination has [{}]",
                theirs.join(", "),
                ours.join(", ")
            ))
        })?;
    let ram = hello
        .layout
        .iter()
        .fold(0u64, |sum, r| sum.saturating_add(r.length));
    if ram > options.max_guest_ram {
        return Err(MigrationError::Rejected(format!(
            "the VM declares {ram} bytes of guest RAM, over this destination's limit of {} bytes",
            options.max_guest_ram
        )));
    }
    let mut end = 0u64;
    for r in &hello.layout {
        if r.gpa < end || r.length == 0 {
            return Err(MigrationError::Rejected(
                "memory layout regions overlap or are empty".into(),
            ));
        }
        end = r
            .end()
            .ok_or_else(|| MigrationError::Rejected("memory region overflows".into()))?;
    }
    let features = if version >= FEATURES_SINCE {
        hello.features & options.features & KNOWN_FEATURES
    } else {
        0
    };
    Ok(Negotiated {
        version,
        codec,
        features,
    })
}

fn receive<M, S, F>(
    ch: &mut Channel<S>,
    accept: Option<&mut Acceptor<'_>>,
    options: &ReceiveOptions,
    build: F,
) -> Result<(M, ReceiveReport), MigrationError>
where
    M: Migratable,
    S: Read + Write,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let overall = options.max_time.and_then(|t| Instant::now().checked_add(t));
    ch.set_deadline(overall);
    ch.set_frame_timeout(Some(options.handshake_timeout));
    let hello = match ch.recv()? {
        Message::Hello(h) => h,
        Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
        other => {
            return Err(MigrationError::Unexpected {
                got: other.message_type(),
                state: "waiting for HELLO",
            })
        }
    };
    ch.set_frame_timeout(Some(options.frame_timeout));
    tracing::info!(
        version = hello.version,
        arch = ?hello.arch,
        regions = hello.layout.len(),
        ram_bytes = hello.layout.iter().fold(0u64, |s, r| s.saturating_add(r.length)),
        producer = ?hello.producer,
        "HELLO received"
    );
    let Negotiated {
        version,
        codec,
        features,
    } = negotiate(&hello, options)?;
    // No multi-connection without a way to accept more connections, or with a limit of 1.
    let features = if accept.is_some() && options.max_connections > 1 {
        features
    } else {
        features & !FEATURE_MULTI_CONNECTION
    };
    let incoming = IncomingVm {
        version,
        arch: hello.arch,
        layout: hello.layout,
        config: hello.config,
        producer: hello.producer,
        features,
    };
    let mut vm = build_incoming(&incoming, build)?;
    let layout = vm.memory_sink().regions();
    // Several connections: offered, enabled, possible here (a listener to accept
    // them from, a memory several threads may write).
    let multi = (features & FEATURE_MULTI_CONNECTION != 0
        && vm.memory_sink().as_sync_sink().is_some())
    .then_some(accept)
    .flatten();
    let features = if multi.is_some() {
        features
    } else {
        features & !FEATURE_MULTI_CONNECTION
    };
    tracing::info!(version, codec = %codec.id(), features, "VM built, HELLO accepted");
    ch.send(&Message::HelloAck {
        version,
        codec: codec.id(),
        features,
    })?;
    ch.flush()?;

    let mut report = ReceiveReport::default();
    let sink = vm.memory_sink();
    match (multi, sink.as_sync_sink()) {
        (Some(accept), Some(shared)) => {
            let secondaries = multi::accept_secondaries(
                ch,
                accept,
                options.max_connections,
                options.handshake_timeout,
                options.frame_timeout,
                overall,
            )?;
            multi::receive_rounds(
                secondaries,
                shared,
                &layout,
                version,
                options.frame_timeout,
                |barrier| {
                    let r = receive_rounds(ch, sink, &layout, version, &mut report, Some(barrier))
                        .map_err(|e| barrier.first_error(e));
                    if let Err(e) = &r {
                        // Now, so that the source closes the other connections and
                        // their threads end.
                        abort(ch, e);
                    }
                    r
                },
            )?
        }
        _ => receive_rounds(ch, sink, &layout, version, &mut report, None)?,
    }

    let mut state: Vec<u8> = Vec::new();
    // READY sent: the state is restored, only GO (or ABORT) may follow.
    let mut ready = false;
    loop {
        match ch.recv()? {
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            Message::Go if !ready => {
                return Err(MigrationError::Unexpected {
                    got: MessageType::Go,
                    state: "receiving device state (no READY yet)",
                })
            }
            other if ready && other.message_type() != MessageType::Go => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "waiting for GO after READY",
                })
            }
            Message::State { last, data } => {
                if state.len() + data.len() > MAX_STATE {
                    return Err(MigrationError::Malformed(format!(
                        "device state over the limit of {MAX_STATE} bytes"
                    )));
                }
                state.extend_from_slice(data);
                if last {
                    report.state_bytes = state.len() as u64;
                    let mut snapshot: Snapshot =
                        codec::decode(codec.as_ref(), &state).map_err(|source| {
                            MigratableError::Codec {
                                path: String::new(),
                                section: "<state tree>".into(),
                                source,
                            }
                        })?;
                    snapshot.resolve_codecs(&options.codecs);
                    // Every section's codec, before any state is written.
                    snapshot.check_codecs(&options.codecs)?;
                    let t = Instant::now();
                    vm.restore(&snapshot)?;
                    tracing::info!(
                        state_bytes = report.state_bytes,
                        rounds = report.rounds,
                        restore = ?t.elapsed(),
                        "device state restored, READY"
                    );
                    ch.send(&Message::Ready)?;
                    ch.flush()?;
                    ready = true;
                }
            }
            Message::Go => {
                // Complete before resuming: if it fails, the ABORT that follows is
                // true (this guest never ran), and the source may resume its own.
                vm.complete_migration()?;
                vm.resume()?;
                tracing::info!("GO received: the VM runs here");
                ch.send(&Message::Done)?;
                // The VM runs here now, whether or not DONE reaches the source.
                let _ = ch.flush();
                return Ok((vm, report));
            }
            other => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "receiving device state",
                })
            }
        }
    }
}

/// Receives memory rounds on the primary connection until the last ROUND_END, at
/// each one waiting at `barrier` for the other connections' share of the round.
fn receive_rounds<S: Read + Write>(
    ch: &mut Channel<S>,
    sink: &dyn MemorySink,
    layout: &[MemoryRange],
    version: u32,
    report: &mut ReceiveReport,
    mut barrier: Option<&mut Barrier>,
) -> Result<(), MigrationError> {
    let mut fresh = true; // round 0: memory is still all zero
    loop {
        // MEMORY data goes from the socket straight into guest memory (checked against
        // the layout first); a MEMORY frame without data never decodes.
        let message = match ch.recv_into(sink, layout)? {
            Received::MemoryWritten(range) => {
                report.memory_bytes = report.memory_bytes.saturating_add(range.length);
                continue;
            }
            Received::Message(message) => message,
        };
        match message {
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            Message::Zero(ranges) => {
                if version < 2 {
                    return Err(MigrationError::Malformed(
                        "ZERO frame in protocol version 1".into(),
                    ));
                }
                for r in ranges {
                    check_range(layout, r)?;
                    if !fresh {
                        sink.zero_memory(r.gpa, r.length)?;
                    }
                    report.zero_bytes = report.zero_bytes.saturating_add(r.length);
                }
            }
            Message::RoundEnd { round, last } => {
                if round != report.rounds {
                    return Err(MigrationError::Malformed(format!(
                        "ROUND_END of round {round}, expected round {}",
                        report.rounds
                    )));
                }
                if let Some(b) = barrier.as_deref_mut() {
                    let (memory, zero) = b.round_end(round, last)?;
                    report.memory_bytes = report.memory_bytes.saturating_add(memory);
                    report.zero_bytes = report.zero_bytes.saturating_add(zero);
                }
                fresh = false;
                report.rounds += 1;
                tracing::debug!(
                    round,
                    memory_bytes = report.memory_bytes,
                    zero_bytes = report.zero_bytes,
                    "round received"
                );
                if last {
                    return Ok(());
                }
            }
            other => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "receiving memory rounds",
                })
            }
        }
    }
}
