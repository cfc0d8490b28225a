//! The precopy driver, source side: send a running VM's memory in rounds of dirty
//! pages, pause it when the rest fits the downtime limit, send the rest and the
//! device state, and hand over. Generic over [`Migratable`], so a fake VM migrates
//! the same way a KVM VM does.
//!
//! The source VM survives every failure before the commit point (the GO message):
//! dirty logging is stopped, the VM is resumed if it was paused, and the destination
//! is sent an ABORT with the reason.

use std::fmt;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::arch::Arch;
use crate::codec::{self, Codec, CodecId};
use crate::convergence::{AutoConverge, ConvergenceFailure, GiveUp, Throttled};
use crate::endpoint::Endpoint;
use crate::error::MigratableError;
use crate::memory::{page_runs, MemoryRange, MemoryRangeTable, MemorySource, PageRun, PAGE_SIZE};
use crate::migratable::{Migratable, MigrationRole};
use crate::multi::{self, BoxedConnection, Secondaries};
use crate::protocol::{
    Channel, Hello, Message, MessageType, MigrationError, FEATURE_MULTI_CONNECTION,
    MAX_MEMORY_CHUNK, MAX_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::security::Security;

/// What to do when precopy gives up: the round or time cap is hit, or the guest
/// dirties memory faster than the link carries it for
/// [`MigrationOptions::stall_rounds`] rounds while the throttle cannot rise. The error
/// or the log says why, with both rates ([`ConvergenceFailure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvergencePolicy {
    /// Give up: abort the migration; the source keeps running.
    Cancel,
    /// Pause anyway and send the rest, accepting a longer downtime.
    Force,
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sending memory while the VM runs.
    Precopy,
    /// The VM is paused; sending the last dirty pages.
    FinalRound,
    /// Sending device state.
    State,
    /// Waiting for the destination to resume.
    Handover,
}

/// Progress reported to [`MigrationOptions::progress`].
#[derive(Clone, Debug)]
pub struct Progress {
    /// Current phase.
    pub phase: Phase,
    /// Current round, from 0.
    pub round: u32,
    /// Bytes of guest memory this round will cover.
    pub round_total: u64,
    /// Bytes of guest memory covered so far this round.
    pub round_done: u64,
    /// Bytes put on the wire so far.
    pub bytes_sent: u64,
    /// The last measured dirty rate, bytes per second (0 before the first read).
    pub dirty_rate: f64,
    /// The link bandwidth estimate, bytes per second (0 before round 0 ended).
    pub bandwidth: f64,
    /// The auto-converge throttle in force, percent.
    pub throttle: u8,
}

/// A progress callback.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// Options of [`send_migration_over`].
pub struct MigrationOptions {
    /// Longest acceptable pause of the guest (estimated from the measured bandwidth).
    pub downtime_limit: Duration,
    /// Most precopy rounds after round 0.
    pub max_rounds: u32,
    /// Longest time to spend in precopy.
    pub max_time: Duration,
    /// What to do when precopy gives up.
    pub policy: ConvergencePolicy,
    /// Throttle the guest while precopy does not converge (`None`: precopy alone).
    /// Used only if the VM [can be throttled](Migratable::can_throttle).
    pub auto_converge: Option<AutoConverge>,
    /// Give up after this many consecutive rounds of dirty pages in which the guest
    /// dirtied memory faster than the link carried it and the throttle could not rise
    /// (0: never; only the caps end precopy).
    pub stall_rounds: u32,
    /// Highest protocol version to speak (tests use older ones).
    pub protocol_version: u32,
    /// Architecture announced to the destination.
    pub arch: Arch,
    /// Opaque VMM configuration the destination needs to build the VM.
    pub config: Vec<u8>,
    /// Producer name announced in the handshake.
    pub producer: String,
    /// Optional features to offer (`FEATURE_*` bits of [`protocol`](crate::protocol);
    /// default none). The destination accepts a subset; [`MigrationReport::features`]
    /// says which.
    pub features: u64,
    /// Called as memory goes out, at least once per chunk.
    pub progress: Option<ProgressFn>,
    /// Connections to carry guest memory over, the first included (default 1). Above
    /// 1, [`send_migration_with`] offers the multi-connection feature ([`crate::multi`])
    /// and opens the others to the same URL if the destination accepts; the
    /// destination's limit caps the number.
    pub connections: usize,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            max_time: Duration::from_secs(120),
            policy: ConvergencePolicy::Cancel,
            auto_converge: None,
            stall_rounds: 3,
            protocol_version: PROTOCOL_VERSION,
            arch: Arch::host(),
            config: Vec::new(),
            producer: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).to_owned(),
            features: 0,
            progress: None,
            connections: 1,
        }
    }
}

impl fmt::Debug for MigrationOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationOptions")
            .field("downtime_limit", &self.downtime_limit)
            .field("max_rounds", &self.max_rounds)
            .field("max_time", &self.max_time)
            .field("policy", &self.policy)
            .field("auto_converge", &self.auto_converge)
            .field("stall_rounds", &self.stall_rounds)
            .field("protocol_version", &self.protocol_version)
            .field("arch", &self.arch)
            .field("config_len", &self.config.len())
            .field("producer", &self.producer)
            .field("features", &format_args!("{:#x}", self.features))
            .field("progress", &self.progress.is_some())
            .field("connections", &self.connections)
            .finish()
    }
}

/// One memory round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundReport {
    /// Round number (0 sends all memory).
    pub round: u32,
    /// Guest bytes the round covered (dirty bytes; all RAM in round 0).
    pub guest_bytes: u64,
    /// Pages sent as data.
    pub pages: u64,
    /// Pages sent as zero ranges (a few bytes each).
    pub zero_pages: u64,
    /// Bytes put on the wire.
    pub wire_bytes: u64,
    /// How long the round took.
    pub duration: Duration,
    /// Bytes the dirty log reported after the round (dirtied while it was sent).
    pub dirty_bytes: u64,
    /// `dirty_bytes` over the time since the previous read, bytes per second (0 for
    /// the final round: the guest was paused).
    pub dirty_rate: f64,
    /// The link bandwidth estimate after the round, bytes per second (what the
    /// downtime estimate divides by; for the final round, the estimate the switch-over
    /// was decided on).
    pub bandwidth: f64,
    /// The auto-converge throttle in force while the round was sent, percent.
    pub throttle: u8,
}

/// How long the guest was paused, by phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Downtime {
    /// Pause, last dirty log and last round of pages.
    pub final_round: Duration,
    /// Snapshot of device state and its encoding.
    pub state_capture: Duration,
    /// Sending the state and the destination restoring it (until READY).
    pub state_send: Duration,
    /// GO until the destination reports it resumed (DONE).
    pub resume: Duration,
    /// From pause to DONE.
    pub total: Duration,
}

/// What a migration did.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationReport {
    /// Every round, the last one sent while paused.
    pub rounds: Vec<RoundReport>,
    /// Bytes put on the wire in all.
    pub bytes_sent: u64,
    /// Bandwidth measured over the memory rounds, bytes per second.
    pub bandwidth: f64,
    /// From connect to DONE.
    pub total_time: Duration,
    /// The guest's pause, by phase.
    pub downtime: Downtime,
    /// Whether the estimate fell under the limit (false: forced by policy).
    pub converged: bool,
    /// Protocol version used.
    pub protocol_version: u32,
    /// Codec the state was encoded with.
    pub codec: CodecId,
    /// Optional features the destination accepted (`FEATURE_*` bits).
    pub features: u64,
}

/// One line per round, then the downtime by phase:
///
/// ```text
/// round  0:  1024.0 MiB guest,  258062 pages,    4082 zero pages,  1008.1 MiB wire,   295.55 ms, dirty     0.0 MB/s, link  3577.0 MB/s, throttle  0 %
/// round  1:     0.0 MiB guest,       2 pages,       0 zero pages,     0.0 MiB wire,     0.02 ms, dirty     0.0 MB/s, link   409.6 MB/s, throttle  0 %
/// downtime 1.02 ms = final round 0.10 + state capture 0.24 + state send 0.46 + resume 0.23
/// ```
impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for r in &self.rounds {
            writeln!(
                f,
                "round {:>2}: {:>7.1} MiB guest, {:>7} pages, {:>7} zero pages, {:>7.1} MiB wire, {:>8.2} ms, dirty {:>7.1} MB/s, link {:>7.1} MB/s, throttle {:>2} %",
                r.round,
                mib(r.guest_bytes),
                r.pages,
                r.zero_pages,
                mib(r.wire_bytes),
                ms(r.duration),
                r.dirty_rate / 1e6,
                r.bandwidth / 1e6,
                r.throttle
            )?;
        }
        let d = &self.downtime;
        write!(
            f,
            "downtime {:.2} ms = final round {:.2} + state capture {:.2} + state send {:.2} + resume {:.2}",
            ms(d.total),
            ms(d.final_round),
            ms(d.state_capture),
            ms(d.state_send),
            ms(d.resume)
        )
    }
}

/// Migrates `vm` over a connected `stream` to a destination running
/// [`receive_migration_over`](crate::destination::receive_migration_over).
///
/// On success the source VM is paused with dirty logging stopped and
/// `complete_migration` called: the guest runs on the destination. On any error
/// before the commit point the source VM is running again; the error says why.
pub fn send_migration_over<M, S>(
    vm: &mut M,
    stream: S,
    options: &mut MigrationOptions,
) -> Result<MigrationReport, MigrationError>
where
    M: Migratable + ?Sized,
    S: Read + Write,
{
    send(vm, stream, None, options)
}

/// [`send_migration_over`] with more connections at hand: if
/// [`MigrationOptions::connections`] is above 1 and the destination accepts, `connect`
/// is called for each further connection (with its index, from 1) and guest memory
/// travels over all of them ([`crate::multi`]). The destination side is
/// [`receive_migration_over_connections`](crate::destination::receive_migration_over_connections).
pub fn send_migration_over_connections<M, S, C>(
    vm: &mut M,
    stream: S,
    mut connect: impl FnMut(usize) -> std::io::Result<C>,
    options: &mut MigrationOptions,
) -> Result<MigrationReport, MigrationError>
where
    M: Migratable + ?Sized,
    S: Read + Write,
    C: multi::Connection + 'static,
{
    let mut connect =
        |i: usize| -> Result<BoxedConnection, MigrationError> { Ok(Box::new(connect(i)?)) };
    send(vm, stream, Some(&mut connect), options)
}

fn send<M, S>(
    vm: &mut M,
    stream: S,
    connect: Option<&mut dyn FnMut(usize) -> Result<BoxedConnection, MigrationError>>,
    options: &mut MigrationOptions,
) -> Result<MigrationReport, MigrationError>
where
    M: Migratable + ?Sized,
    S: Read + Write,
{
    let _span = tracing::info_span!("migrate_out").entered();
    let mut source = Source::new(stream, connect);
    // Lifts the throttle on every exit, a panic included.
    let mut vm = Throttled::new(vm);
    match source.run(&mut vm, options) {
        Ok(report) => Ok(report),
        Err(e) => {
            let e = source.recover(&mut vm, e);
            match &e {
                MigrationError::CommitUncertain => {
                    tracing::error!(error = %e, "connection lost after GO: the source stays paused")
                }
                // `?`: the error may quote the peer's reason (untrusted text).
                _ => {
                    tracing::warn!(error = ?e.to_string(), "migration aborted: the source runs on")
                }
            }
            Err(e)
        }
    }
}

/// Migrates `vm` to the destination listening at `url` (`tcp://host:port` or
/// `unix:///path`). See [`send_migration_over`]. A destination silent for longer than
/// `io_timeout` is an error (and the source resumes). For `tls://host:port` use
/// [`send_migration_with`].
pub fn send_migration<M: Migratable + ?Sized>(
    vm: &mut M,
    url: &str,
    options: &mut MigrationOptions,
    io_timeout: Duration,
) -> Result<MigrationReport, MigrationError> {
    send_migration_with(vm, url, &Security::plaintext(), options, io_timeout)
}

/// [`send_migration`] under `security`: with TLS credentials and a `tls://host:port`
/// URL, the TLS handshake, the verification of the destination's certificate and name
/// and the destination's authorization of ours all complete before the HELLO; a
/// refusal is [`MigrationError::Security`] naming the reason, and the VM never paused.
pub fn send_migration_with<M: Migratable + ?Sized>(
    vm: &mut M,
    url: &str,
    security: &Security,
    options: &mut MigrationOptions,
    io_timeout: Duration,
) -> Result<MigrationReport, MigrationError> {
    let endpoint = Endpoint::parse(url).map_err(MigrationError::endpoint)?;
    let stream = endpoint.connect_with(security, Some(io_timeout))?;
    if options.connections <= 1 {
        return send_migration_over(vm, stream, options);
    }
    // Every connection of a multi-connection migration has deadlines both ways.
    stream.set_write_timeout(Some(io_timeout))?;
    let mut connect = |_: usize| -> Result<BoxedConnection, MigrationError> {
        let s = endpoint.connect_with(security, Some(io_timeout))?;
        s.set_write_timeout(Some(io_timeout))?;
        Ok(Box::new(s))
    };
    send(vm, stream, Some(&mut connect), options)
}

pub(crate) struct Source<'c, S: Read + Write> {
    pub(crate) ch: Channel<S>,
    /// Opens secondary connections (multi-connection), if the caller can.
    connect: Option<&'c mut dyn FnMut(usize) -> Result<BoxedConnection, MigrationError>>,
    /// The secondary connections, once the destination accepted them.
    multi: Option<Secondaries>,
    pub(crate) paused: bool,
    pub(crate) dirty_logging: bool,
    pub(crate) committed: bool,
    /// The destination answered the HELLO with HELLO_ACK.
    accepted: bool,
    started: Instant,
    /// What progress reports carry besides the bytes.
    rates: Rates,
}

/// The dirty rate, bandwidth and throttle last known, for progress reports.
#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    dirty_rate: f64,
    bandwidth: f64,
    throttle: u8,
}

impl<'c, S: Read + Write> Source<'c, S> {
    /// A source that has sent nothing yet over `stream`, opening secondary
    /// connections through `connect` if the destination takes them.
    pub(crate) fn new(
        stream: S,
        connect: Option<&'c mut dyn FnMut(usize) -> Result<BoxedConnection, MigrationError>>,
    ) -> Self {
        Self {
            ch: Channel::new(stream),
            connect,
            multi: None,
            paused: false,
            dirty_logging: false,
            committed: false,
            accepted: false,
            started: Instant::now(),
            rates: Rates::default(),
        }
    }

    fn run<M: Migratable + ?Sized>(
        &mut self,
        vm: &mut Throttled<'_, M>,
        options: &mut MigrationOptions,
    ) -> Result<MigrationReport, MigrationError> {
        let (version, codec, features) = self.handshake(&**vm, options)?;
        tracing::info!(version, codec = %codec.id(), features, "handshake accepted");
        vm.start_migration(MigrationRole::Source)?;
        vm.start_dirty_log()?;
        self.dirty_logging = true;
        let mut last_read = Instant::now();
        let auto = options.auto_converge.filter(|_| vm.can_throttle());
        if options.auto_converge.is_some() && auto.is_none() {
            tracing::warn!("auto-converge asked for, but this VM cannot be throttled");
        }

        let mut rounds = Vec::new();
        let mut buf = vec![0u8; MAX_MEMORY_CHUNK.min(2 << 20)];
        let mut all = MemoryRangeTable::new();
        for r in vm.memory_source().regions() {
            all.push(r);
        }
        let precopy_start = Instant::now();
        let r0 = self.send_round(&**vm, &all, 0, false, version, &mut buf, options)?;
        let mut bandwidth = r0.bandwidth();
        rounds.push(r0);
        // Consecutive rounds in which the guest outran the link with the throttle
        // unable to rise.
        let mut stalled = 0u32;

        // Precopy rounds until the estimate fits the limit or the policy gives up.
        let (pending, converged) = loop {
            let dirty = vm.dirty_log()?;
            let now = Instant::now();
            let dirty_bytes = dirty.total_bytes();
            let dirty_rate =
                dirty_bytes as f64 / now.duration_since(last_read).as_secs_f64().max(1e-6);
            last_read = now;
            if let Some(r) = rounds.last_mut() {
                r.dirty_bytes = dirty_bytes;
                r.dirty_rate = dirty_rate;
                r.bandwidth = bandwidth;
            }
            self.rates.dirty_rate = dirty_rate;
            self.rates.bandwidth = bandwidth;
            let estimated = Duration::from_secs_f64(dirty_bytes as f64 / bandwidth);
            tracing::info!(
                dirty_pages = dirty_bytes / PAGE_SIZE,
                dirty_bytes,
                dirty_mb_s = %format_args!("{:.1}", dirty_rate / 1e6),
                bandwidth_mb_s = %format_args!("{:.1}", bandwidth / 1e6),
                throttle = vm.percent(),
                estimated_downtime = ?estimated,
                limit = ?options.downtime_limit,
                "dirty log read"
            );
            if estimated <= options.downtime_limit {
                break (dirty, true);
            }
            let round = rounds.len() as u32;
            // Round 0 sent all RAM (zero pages cost nearly nothing on the wire): judge
            // the rates from round 1 on.
            let can_rise = auto.is_some_and(|a| a.can_rise(vm.percent()));
            if round >= 2 && dirty_rate > bandwidth && !can_rise {
                stalled += 1;
            } else {
                stalled = 0;
            }
            let give_up = if options.stall_rounds > 0 && stalled >= options.stall_rounds {
                Some(GiveUp::DirtyFasterThanLink)
            } else if round > options.max_rounds {
                Some(GiveUp::RoundCap)
            } else if self.started.elapsed() >= options.max_time {
                Some(GiveUp::TimeCap)
            } else {
                None
            };
            if let Some(reason) = give_up {
                let failure = ConvergenceFailure {
                    reason,
                    rounds: round,
                    remaining: dirty_bytes,
                    estimated,
                    limit: options.downtime_limit,
                    dirty_rate,
                    bandwidth,
                    throttle: vm.percent(),
                    throttling: vm.can_throttle(),
                };
                match options.policy {
                    ConvergencePolicy::Force => {
                        tracing::warn!(why = %failure, "precopy gave up: forcing the switch-over");
                        break (dirty, false);
                    }
                    ConvergencePolicy::Cancel => {
                        return Err(MigrationError::NotConverged(Box::new(failure)))
                    }
                }
            }
            // Auto-converge: from the first round of dirty pages that did not converge.
            if let Some(a) = auto.filter(|_| round >= 2) {
                let next = a.next(vm.percent());
                if next != vm.percent() {
                    vm.set(next)?;
                    self.rates.throttle = next;
                    tracing::info!(throttle = next, "auto-converge: throttle raised");
                }
            }
            let mut report =
                self.send_round(&**vm, &dirty, round, false, version, &mut buf, options)?;
            report.throttle = vm.percent();
            if report.duration >= Duration::from_millis(1) {
                bandwidth = report.bandwidth();
            }
            rounds.push(report);
            // A short round mostly fills socket buffers and looks faster than the link:
            // never trust it over the rate sustained since precopy began.
            let sent: u64 = rounds.iter().map(|r| r.wire_bytes).sum();
            let sustained = sent as f64 / precopy_start.elapsed().as_secs_f64().max(1e-6);
            bandwidth = bandwidth.min(sustained.max(1.0));
        };

        // Downtime starts here.
        let paused_at = Instant::now();
        vm.pause()?;
        self.paused = true;
        tracing::info!(converged, pause_took = ?paused_at.elapsed(), "source paused for the final round");
        let throttle = vm.percent();
        // A paused guest needs no throttle; from here on no path resumes it throttled.
        vm.lift()?;
        self.rates.throttle = 0;
        let mut last = pending;
        last.extend(&vm.dirty_log()?);
        let round = rounds.len() as u32;
        let mut report = self.send_round(&**vm, &last, round, true, version, &mut buf, options)?;
        report.throttle = throttle;
        // The estimate the switch-over was decided on (a short final round measures
        // little but latency).
        report.bandwidth = bandwidth;
        rounds.push(report);
        let final_round = paused_at.elapsed();

        self.progress(options, Phase::State, round, 0, 0);
        let t = Instant::now();
        let mut snapshot = vm.snapshot()?;
        snapshot.encode(&codec)?;
        let state =
            codec::encode(codec.as_ref(), &snapshot).map_err(|source| MigratableError::Codec {
                path: snapshot.id().to_owned(),
                section: String::new(),
                source,
            })?;
        let state_capture = t.elapsed();
        tracing::info!(state_bytes = state.len(), capture = ?state_capture, "device state captured");

        let t = Instant::now();
        self.send_state(&state)?;
        let state_send = t.elapsed();

        self.progress(options, Phase::Handover, round, 0, 0);
        let t = Instant::now();
        self.ch.send(&Message::Go)?;
        self.ch.flush()?;
        self.committed = true;
        tracing::info!("GO sent: committed, the destination resumes the guest");
        self.expect(MessageType::Done, "waiting for the destination to resume")?;
        let resume = t.elapsed();
        let total = paused_at.elapsed();

        self.dirty_logging = false;
        vm.stop_dirty_log()?;
        vm.complete_migration()?;

        tracing::info!(total = ?self.started.elapsed(), downtime = ?total, "migration completed");
        let memory_time: Duration = rounds.iter().map(|r| r.duration).sum();
        let memory_bytes: u64 = rounds.iter().map(|r| r.wire_bytes).sum();
        Ok(MigrationReport {
            rounds,
            bytes_sent: self.bytes_sent(),
            bandwidth: memory_bytes as f64 / memory_time.as_secs_f64().max(1e-9),
            total_time: self.started.elapsed(),
            downtime: Downtime {
                final_round,
                state_capture,
                state_send,
                resume,
                total,
            },
            converged,
            protocol_version: version,
            codec: codec.id(),
            features,
        })
    }

    pub(crate) fn handshake<M: Migratable + ?Sized>(
        &mut self,
        vm: &M,
        options: &MigrationOptions,
    ) -> Result<(u32, std::sync::Arc<dyn Codec>, u64), MigrationError> {
        let registry = vm.codecs();
        let mut codecs: Vec<CodecId> = registry.preferred().map(|c| c.id()).into_iter().collect();
        for id in registry.iter().map(|c| c.id()) {
            if !codecs.contains(&id) {
                codecs.push(id);
            }
        }
        if codecs.is_empty() {
            return Err(MigrationError::Rejected(
                "the source VM has no codec registered".into(),
            ));
        }
        let version = options
            .protocol_version
            .clamp(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
        // Several connections: asked for, and possible (a way to open them, a memory
        // several threads may read).
        let multi = options.connections > 1
            && self.connect.is_some()
            && vm.memory_source().as_sync().is_some();
        // A caller may offer the bit without the means: it then asks for 1 connection.
        let offered = if multi {
            options.features | FEATURE_MULTI_CONNECTION
        } else {
            options.features
        };
        self.ch.send(&Message::Hello(Hello {
            version,
            min_version: MIN_PROTOCOL_VERSION,
            arch: options.arch,
            codecs,
            layout: vm.memory_source().regions(),
            config: options.config.clone(),
            producer: options.producer.clone(),
            features: offered,
        }))?;
        match self.ch.recv()? {
            Message::HelloAck {
                version: v,
                codec,
                features,
            } => {
                if !(MIN_PROTOCOL_VERSION..=version).contains(&v) {
                    return Err(MigrationError::Rejected(format!(
                        "destination chose protocol version {v}, this source speaks {MIN_PROTOCOL_VERSION} to {version}"
                    )));
                }
                let codec = registry.get(codec).cloned().ok_or_else(|| {
                    MigrationError::Rejected(format!(
                        "destination chose codec `{codec}`, which was not offered"
                    ))
                })?;
                if features & !offered != 0 {
                    return Err(MigrationError::Rejected(format!(
                        "destination accepted features {features:#x}, this source offered {offered:#x}"
                    )));
                }
                self.accepted = true;
                if features & FEATURE_MULTI_CONNECTION != 0 {
                    let mut none = |_: usize| -> Result<BoxedConnection, MigrationError> {
                        Err(MigrationError::Rejected(
                            "no way to open more connections".into(),
                        ))
                    };
                    let (wanted, connect) = match self.connect.as_deref_mut() {
                        Some(connect) if multi => (options.connections, connect),
                        _ => (1, &mut none as &mut dyn FnMut(usize) -> _),
                    };
                    self.multi = Some(Secondaries::open(&mut self.ch, wanted, connect)?);
                }
                Ok((v, codec, features))
            }
            Message::Abort(reason) => {
                tracing::warn!(reason = ?reason, "the destination refused the migration");
                Err(MigrationError::Refused(reason))
            }
            other => Err(MigrationError::Unexpected {
                got: other.message_type(),
                state: "waiting for HELLO_ACK",
            }),
        }
    }

    /// Sends the pages of `table` (dealt to every connection of a multi-connection
    /// migration, see [`crate::multi`]), then ROUND_END on the primary connection.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_round<M: Migratable + ?Sized>(
        &mut self,
        vm: &M,
        table: &MemoryRangeTable,
        round: u32,
        last: bool,
        version: u32,
        buf: &mut [u8],
        options: &mut MigrationOptions,
    ) -> Result<RoundReport, MigrationError> {
        let start = Instant::now();
        let wire_start = self.bytes_sent();
        let phase = if last {
            Phase::FinalRound
        } else {
            Phase::Precopy
        };
        let total = table.total_bytes();
        let mut report = RoundReport {
            round,
            guest_bytes: total,
            ..RoundReport::default()
        };
        let memory = vm.memory_source();
        let rates = self.rates;
        match (&mut self.multi, memory.as_sync()) {
            (Some(multi), Some(shared)) => {
                let shares = multi::shares(table, multi.count());
                // Progress follows the primary's share, scaled to the round.
                let scale = total as f64 / shares[0].total_bytes().max(1) as f64;
                let others = multi.bytes_sent();
                let chunk = buf.len();
                let send = |ch: &mut Channel<BoxedConnection>,
                            buf: &mut Vec<u8>,
                            share: &MemoryRangeTable| {
                    buf.resize(chunk, 0);
                    let mut r = RoundReport::default();
                    send_pages(ch, shared, share, version, buf, &mut r, &mut |_, _| {})?;
                    Ok(r)
                };
                let ch = &mut self.ch;
                let reports = multi.send_round(&shares, round, last, &send, |share| {
                    let mut r = RoundReport::default();
                    send_pages(
                        ch,
                        memory,
                        share,
                        version,
                        buf,
                        &mut r,
                        &mut |done, sent| {
                            let done = ((done as f64 * scale) as u64).min(total);
                            report_progress(
                                options,
                                rates,
                                phase,
                                round,
                                total,
                                done,
                                sent + others,
                            )
                        },
                    )?;
                    Ok(r)
                })?;
                for r in reports {
                    report.pages += r.pages;
                    report.zero_pages += r.zero_pages;
                }
            }
            _ => {
                let others = self.multi.as_ref().map_or(0, Secondaries::bytes_sent);
                send_pages(
                    &mut self.ch,
                    memory,
                    table,
                    version,
                    buf,
                    &mut report,
                    &mut |done, sent| {
                        report_progress(options, rates, phase, round, total, done, sent + others)
                    },
                )?
            }
        }
        self.ch.send(&Message::RoundEnd { round, last })?;
        self.ch.flush()?;
        report.wire_bytes = self.bytes_sent() - wire_start;
        report.duration = start.elapsed();
        tracing::info!(
            round,
            last,
            guest_bytes = report.guest_bytes,
            pages = report.pages,
            zero_pages = report.zero_pages,
            wire_bytes = report.wire_bytes,
            elapsed = ?report.duration,
            bandwidth_mib_s = %format_args!("{:.1}", report.bandwidth() / f64::from(1u32 << 20)),
            "round sent"
        );
        Ok(report)
    }

    /// Bytes framed on every connection so far.
    fn bytes_sent(&self) -> u64 {
        self.ch.bytes_sent() + self.multi.as_ref().map_or(0, Secondaries::bytes_sent)
    }

    /// Sends the encoded device state in STATE frames (one empty frame if there is
    /// none) and waits for READY: the destination restored it.
    pub(crate) fn send_state(&mut self, state: &[u8]) -> Result<(), MigrationError> {
        let piece = MAX_PAYLOAD as usize - 1;
        let mut chunks = state.chunks(piece).peekable();
        if chunks.peek().is_none() {
            self.ch.send(&Message::State {
                last: true,
                data: &[],
            })?;
        }
        while let Some(data) = chunks.next() {
            let last = chunks.peek().is_none();
            self.ch.send(&Message::State { last, data })?;
        }
        self.expect(
            MessageType::Ready,
            "waiting for the destination to restore state",
        )
    }

    pub(crate) fn expect(
        &mut self,
        want: MessageType,
        state: &'static str,
    ) -> Result<(), MigrationError> {
        match self.ch.recv()? {
            m if m.message_type() == want => Ok(()),
            Message::Abort(reason) => Err(MigrationError::PeerAborted(reason)),
            other => Err(MigrationError::Unexpected {
                got: other.message_type(),
                state,
            }),
        }
    }

    /// Puts the source back to running after `error`, tells the destination why, and
    /// returns the most useful error.
    pub(crate) fn recover<M: Migratable + ?Sized>(
        &mut self,
        vm: &mut Throttled<'_, M>,
        error: MigrationError,
    ) -> MigrationError {
        if self.committed && !matches!(error, MigrationError::PeerAborted(_)) {
            // GO is out and the destination went silent: it may be running. Never run
            // two copies. (An ABORT after GO means it did not resume: fall through.)
            return MigrationError::CommitUncertain;
        }
        let mut error = error;
        match &error {
            MigrationError::PeerAborted(_) | MigrationError::Refused(_) => {}
            MigrationError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                // The destination may have closed after an ABORT: fetch its reason.
                if let Ok(Message::Abort(reason)) = self.ch.recv() {
                    error = if self.accepted {
                        MigrationError::PeerAborted(reason)
                    } else {
                        MigrationError::Refused(reason)
                    };
                }
            }
            other => self.ch.abort(&format!("source: {other}")),
        }
        // Never resume a throttled guest (the guard's drop would lift it too late).
        if let Err(e) = vm.lift() {
            tracing::error!(error = %e, "cannot lift the throttle");
        }
        if self.dirty_logging {
            let _ = vm.stop_dirty_log();
        }
        if self.paused {
            if let Err(e) = vm.resume() {
                return MigrationError::Vm(e);
            }
        }
        error
    }
}

impl RoundReport {
    pub(crate) fn bandwidth(&self) -> f64 {
        (self.wire_bytes.max(1) as f64 / self.duration.as_secs_f64().max(1e-6)).max(1.0)
    }
}

impl<S: Read + Write> Source<'_, S> {
    fn progress(
        &self,
        options: &mut MigrationOptions,
        phase: Phase,
        round: u32,
        total: u64,
        done: u64,
    ) {
        let sent = self.bytes_sent();
        report_progress(options, self.rates, phase, round, total, done, sent);
    }
}

fn report_progress(
    options: &mut MigrationOptions,
    rates: Rates,
    phase: Phase,
    round: u32,
    total: u64,
    done: u64,
    bytes_sent: u64,
) {
    if let Some(cb) = options.progress.as_mut() {
        cb(&Progress {
            phase,
            round,
            round_total: total,
            round_done: done,
            bytes_sent,
            dirty_rate: rates.dirty_rate,
            bandwidth: rates.bandwidth,
            throttle: rates.throttle,
        });
    }
}

/// Sends the pages of `table` on `ch`: non-zero pages as MEMORY, zero pages as ZERO
/// ranges (protocol ≥ 2), counted in `report`; `on_chunk(done, bytes_sent)` after each
/// chunk of `buf`'s size.
fn send_pages<S: Read + Write>(
    ch: &mut Channel<S>,
    memory: &dyn MemorySource,
    table: &MemoryRangeTable,
    version: u32,
    buf: &mut [u8],
    report: &mut RoundReport,
    on_chunk: &mut dyn FnMut(u64, u64),
) -> Result<(), MigrationError> {
    let mut zeros: Vec<MemoryRange> = Vec::new();
    let mut done = 0u64;
    for piece in table.chunks(buf.len() as u64) {
        let chunk = &mut buf[..piece.length as usize];
        memory
            .read_memory(piece.gpa, chunk)
            .map_err(MigratableError::from)?;
        if version >= 2 {
            for PageRun { offset, len, zero } in page_runs(chunk) {
                let gpa = piece.gpa + offset as u64;
                let pages = (len as u64).div_ceil(PAGE_SIZE);
                if zero {
                    report.zero_pages += pages;
                    match zeros.last_mut() {
                        Some(z) if z.gpa + z.length == gpa => z.length += len as u64,
                        _ => zeros.push(MemoryRange::new(gpa, len as u64)),
                    }
                    if zeros.len() >= 4096 {
                        ch.send(&Message::Zero(std::mem::take(&mut zeros)))?;
                    }
                } else {
                    report.pages += pages;
                    ch.send(&Message::Memory {
                        gpa,
                        data: &chunk[offset..offset + len],
                    })?;
                }
            }
        } else {
            report.pages += piece.length.div_ceil(PAGE_SIZE);
            ch.send(&Message::Memory {
                gpa: piece.gpa,
                data: chunk,
            })?;
        }
        done += piece.length;
        on_chunk(done, ch.bytes_sent());
    }
    if !zeros.is_empty() {
        ch.send(&Message::Zero(zeros))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_prints_one_line_per_round_and_the_downtime() {
        let round = |round, guest_bytes, duration| RoundReport {
            round,
            guest_bytes,
            pages: guest_bytes / PAGE_SIZE,
            zero_pages: 0,
            wire_bytes: guest_bytes,
            duration,
            ..RoundReport::default()
        };
        let report = MigrationReport {
            rounds: vec![
                round(0, 1 << 30, Duration::from_millis(300)),
                round(1, 8 << 20, Duration::from_micros(2500)),
            ],
            bytes_sent: (1 << 30) + (8 << 20),
            bandwidth: 3.5e9,
            total_time: Duration::from_millis(310),
            downtime: Downtime {
                final_round: Duration::from_micros(2500),
                state_capture: Duration::from_micros(250),
                state_send: Duration::from_micros(500),
                resume: Duration::from_micros(250),
                total: Duration::from_micros(3500),
            },
            converged: true,
            features: 0,
            protocol_version: PROTOCOL_VERSION,
            codec: CodecId(*b"pcd1"),
        };
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("round  0:  1024.0 MiB guest,  262144 pages"));
        assert!(
            lines[1].contains("8.0 MiB wire,     2.50 ms"),
            "{}",
            lines[1]
        );
        assert_eq!(
            lines[2],
            "downtime 3.50 ms = final round 2.50 + state capture 0.25 + state send 0.50 + resume 0.25"
        );
    }
}
