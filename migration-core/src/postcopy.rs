//! Postcopy: the destination resumes the guest before all of its memory arrived.
//!
//! The source sends memory in round 0 and [`PostcopyOptions::precopy_rounds`] rounds
//! of dirty pages, pauses, and instead of a final round sends the list of pages still
//! to come (POSTCOPY_PENDING) and the device state. The destination restores the
//! state, makes the pending pages *missing* ([`MissingPages::arm_missing`]) and, on
//! GO, resumes at once. A guest access to a missing page waits; the destination asks
//! the source for that page (PAGE_REQUEST), which the source sends before anything
//! else while it pushes the rest in the background. When every pending page arrived
//! the destination sends POSTCOPY_COMPLETE and the source completes.
//!
//! **Recovery.** After GO neither side alone holds the whole guest. If the connection
//! breaks, the source keeps every page (its VM stays paused: [`SourceStranded`]) and
//! the destination's guest keeps running where it can, its vCPUs waiting on missing
//! pages ([`Stranded`]). A new connection continues: the source sends RECOVER with
//! the session, the destination answers RECOVER_ACK with the pages it still misses
//! ([`recover_postcopy_over`], [`Stranded::recover_over`]). **If the source dies
//! during postcopy, the guest is lost**: pages that never reached the destination
//! existed nowhere else ([`MigrationError::GuestLost`]).
//!
//! Generic over [`Migratable`] (and [`MissingPages`] on the destination): core knows
//! no userfaultfd. Both sides read and write at once, so the connection must be
//! [`Duplex`] (a TCP or unix socket; not TLS yet).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::codec;
use crate::convergence::Throttled;
use crate::destination::{build_incoming, negotiate, IncomingVm, Negotiated, ReceiveOptions};
use crate::endpoint::{Listener, Stream};
use crate::error::MigratableError;
use crate::memory::{check_range, page_runs, MemoryRange, MemoryRangeTable, PageRun, PAGE_SIZE};
use crate::migratable::{Migratable, MigrationRole};
use crate::missing_pages::{MissingPages, PagePlacer};
use crate::precopy::{MigrationOptions, RoundReport, Source};
use crate::protocol::{
    Channel, Message, MessageType, MigrationError, Received, FEATURE_POSTCOPY, MAX_PENDING_RANGES,
    MAX_STATE,
};
use crate::snapshot::Snapshot;

/// Largest PAGE_REQUEST the source serves: bigger ones are refused (counted, ignored).
pub const MAX_REQUEST: u32 = 1 << 20;

/// A connection both ends of postcopy read and write from two threads at once.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts both directions down: a thread blocked reading it returns.
    fn shutdown(&self) -> io::Result<()>;
    /// Sets the read timeout of the socket (`None`: reads block).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sets the write timeout of the socket (`None`: writes block).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Caps the socket's send buffer (`SO_SNDBUF`): what is queued there is what a
    /// requested page waits behind. Default: does nothing.
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }
}

impl Duplex for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_socket_send_buffer_size(
            self, bytes,
        )?)
    }
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, std::net::Shutdown::Both)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_socket_send_buffer_size(
            self, bytes,
        )?)
    }
}

impl Duplex for Stream {
    /// `tcp://` and `unix://` only: a TLS session cannot be shared by two threads
    /// here (`Unsupported`).
    fn try_clone(&self) -> io::Result<Self> {
        match self {
            Stream::Tcp(s) => Ok(Stream::Tcp(s.try_clone()?)),
            Stream::Unix(s) => Ok(Stream::Unix(s.try_clone()?)),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "postcopy over tls:// is not supported yet",
            )),
        }
    }
    fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.tcp().shutdown(std::net::Shutdown::Both),
        }
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.tcp().set_write_timeout(timeout),
        }
    }
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_send_buffer(bytes),
            Stream::Unix(s) => s.set_send_buffer(bytes),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => Ok(()),
        }
    }
}

/// Postcopy's own options (the rest is [`MigrationOptions`]).
#[derive(Clone, Debug)]
pub struct PostcopyOptions {
    /// Rounds of dirty pages after round 0 before the switch-over (0: switch right
    /// after round 0).
    pub precopy_rounds: u32,
    /// Bytes pushed in the background between two looks at the page requests.
    pub push_chunk: u64,
    /// The destination must be heard from within this time once everything was sent
    /// (else the connection counts as broken: recover).
    pub peer_timeout: Duration,
    /// The socket send buffer during postcopy (`SO_SNDBUF`; 0: the system's): a
    /// requested page waits behind what the buffer holds of the bulk push.
    pub send_buffer: usize,
}

impl Default for PostcopyOptions {
    fn default() -> Self {
        Self {
            precopy_rounds: 1,
            push_chunk: 256 << 10,
            peer_timeout: Duration::from_secs(60),
            send_buffer: 256 << 10,
        }
    }
}

/// What the source did in a postcopy migration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyReport {
    /// Round 0 and the precopy rounds.
    pub rounds: Vec<RoundReport>,
    /// Bytes of the pages still to come at the switch-over.
    pub pending_bytes: u64,
    /// From pause to the destination's DONE (it resumed): the guest's downtime.
    pub downtime: Duration,
    /// From DONE to POSTCOPY_COMPLETE.
    pub postcopy_time: Duration,
    /// Page requests served.
    pub requests: u64,
    /// Bytes sent because they were requested.
    pub requested_bytes: u64,
    /// Bytes pushed in the background.
    pub pushed_bytes: u64,
    /// Requests refused (outside the layout, unaligned, over [`MAX_REQUEST`]) and
    /// ignored.
    pub refused_requests: u64,
    /// Requests for pages already sent (ignored: they are on their way).
    pub repeated_requests: u64,
    /// Connections that continued an interrupted postcopy.
    pub recoveries: u32,
    /// Bytes put on the wire, all connections.
    pub bytes_sent: u64,
    /// From connect to POSTCOPY_COMPLETE.
    pub total_time: Duration,
}

/// A postcopy whose connection broke after GO, on the source: the VM stays paused,
/// every page is kept. Continue with [`recover_postcopy_over`].
#[derive(Debug)]
pub struct SourceStranded {
    session: u64,
    pending: PageMap,
    unsent: PageMap,
    report: PostcopyReport,
    started: Instant,
    postcopy_start: Option<Instant>,
    reason: String,
}

impl SourceStranded {
    /// Why the connection ended.
    pub fn reason(&self) -> &str {
        &self.reason
    }
    /// The report so far.
    pub fn report(&self) -> &PostcopyReport {
        &self.report
    }
}

/// Errors of the postcopy source.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Before the commit point (GO): the migration failed and the source VM runs
    /// again, as after a failed precopy.
    #[error(transparent)]
    Failed(MigrationError),
    /// After GO the connection broke: the source VM stays paused and keeps every
    /// page; the guest on the destination waits for them. Recover over a new
    /// connection ([`recover_postcopy_over`]).
    #[error("postcopy interrupted ({}): the source keeps the pages; recover over a new connection", crate::text::printable(&.0.reason))]
    Interrupted(Box<SourceStranded>),
}

/// A set of guest pages, one bit per page of the layout.
#[derive(Clone, Debug, PartialEq)]
struct PageMap {
    /// Each region and the index of its first page.
    regions: Vec<(MemoryRange, usize)>,
    bits: Vec<u64>,
    pages: usize,
    count: usize,
}

impl PageMap {
    fn new(layout: &[MemoryRange]) -> Self {
        let mut regions = Vec::with_capacity(layout.len());
        let mut pages = 0usize;
        for r in layout {
            regions.push((*r, pages));
            pages += (r.length / PAGE_SIZE) as usize;
        }
        Self {
            regions,
            bits: vec![0; pages.div_ceil(64)],
            pages,
            count: 0,
        }
    }

    /// The index of the page holding `gpa`.
    fn index(&self, gpa: u64) -> Option<usize> {
        let i = self.regions.partition_point(|(r, _)| r.gpa <= gpa);
        let (r, first) = self.regions.get(i.checked_sub(1)?)?;
        let off = gpa - r.gpa;
        (off < r.length / PAGE_SIZE * PAGE_SIZE).then(|| first + (off / PAGE_SIZE) as usize)
    }

    fn gpa(&self, i: usize) -> u64 {
        let k = self.regions.partition_point(|(_, first)| *first <= i) - 1;
        let (r, first) = self.regions[k];
        r.gpa + (i - first) as u64 * PAGE_SIZE
    }

    /// The first page index after the region holding page `i`.
    fn region_end(&self, i: usize) -> usize {
        let k = self.regions.partition_point(|(_, first)| *first <= i);
        self.regions.get(k).map_or(self.pages, |(_, first)| *first)
    }

    fn get(&self, i: usize) -> bool {
        self.bits[i / 64] >> (i % 64) & 1 == 1
    }

    fn set(&mut self, i: usize) -> bool {
        let was = self.get(i);
        if !was {
            self.bits[i / 64] |= 1 << (i % 64);
            self.count += 1;
        }
        !was
    }

    fn clear(&mut self, i: usize) -> bool {
        let was = self.get(i);
        if was {
            self.bits[i / 64] &= !(1 << (i % 64));
            self.count -= 1;
        }
        was
    }

    /// The page indices of `range` (page aligned, inside one region), or `None`.
    fn pages_of(&self, layout: &[MemoryRange], range: MemoryRange) -> Option<(usize, usize)> {
        if range.gpa % PAGE_SIZE != 0 || range.length % PAGE_SIZE != 0 || range.length == 0 {
            return None;
        }
        check_range(layout, range).ok()?;
        let first = self.index(range.gpa)?;
        Some((first, first + (range.length / PAGE_SIZE) as usize))
    }

    /// The first set page at or after `from`, wrapping around.
    fn next_set(&self, from: usize) -> Option<usize> {
        if self.count == 0 {
            return None;
        }
        let scan = |lo: usize, hi: usize| (lo..hi).find(|&i| self.get(i));
        scan(from.min(self.pages), self.pages).or_else(|| scan(0, from.min(self.pages)))
    }

    /// The set pages as ranges.
    fn to_table(&self) -> MemoryRangeTable {
        let mut t = MemoryRangeTable::new();
        let mut i = 0;
        while i < self.pages {
            if self.bits[i / 64] == 0 && i % 64 == 0 {
                i += 64;
                continue;
            }
            if self.get(i) {
                t.push(MemoryRange::new(self.gpa(i), PAGE_SIZE));
            }
            i += 1;
        }
        t
    }
}

/// What the source's reader thread hands to its main loop.
#[derive(Debug)]
enum FromDest {
    Done,
    Request(u64, u32),
    Complete,
    RecoverAck(bool, Vec<MemoryRange>),
    Aborted(String),
    Failed(MigrationError),
}

fn spawn_reader<S: Duplex>(stream: S, tx: Sender<FromDest>) -> JoinHandle<()> {
    thread::spawn(move || {
        let _ = stream.set_read_timeout(None);
        let mut ch = Channel::new(stream);
        loop {
            let (msg, end) = match ch.recv() {
                Ok(Message::Done) => (FromDest::Done, false),
                Ok(Message::PageRequest { gpa, length }) => (FromDest::Request(gpa, length), false),
                Ok(Message::PostcopyComplete) => (FromDest::Complete, true),
                Ok(Message::RecoverAck { last, ranges }) => {
                    (FromDest::RecoverAck(last, ranges), false)
                }
                Ok(Message::Abort(reason)) => (FromDest::Aborted(reason), true),
                Ok(other) => (
                    FromDest::Failed(MigrationError::Unexpected {
                        got: other.message_type(),
                        state: "serving postcopy page requests",
                    }),
                    true,
                ),
                Err(e) => (FromDest::Failed(e), true),
            };
            if tx.send(msg).is_err() || end {
                return;
            }
        }
    })
}

/// Migrates `vm` in postcopy mode over a connected `stream` to a destination running
/// [`receive_postcopy_over`]. Round 0 and [`PostcopyOptions::precopy_rounds`] rounds,
/// then the switch-over; the guest runs on the destination from then on.
///
/// An error before GO is [`PostcopyError::Failed`] and the source runs again. After
/// GO the source VM stays paused: a broken connection is
/// [`PostcopyError::Interrupted`] (recover with [`recover_postcopy_over`]); on success
/// `complete_migration` was called.
pub fn send_postcopy_over<M, S>(
    vm: &mut M,
    stream: S,
    options: &mut MigrationOptions,
    postcopy: &PostcopyOptions,
) -> Result<PostcopyReport, PostcopyError>
where
    M: Migratable + ?Sized,
    S: Duplex,
{
    let _span = tracing::info_span!("postcopy_out").entered();
    let started = Instant::now();
    let (reader_stream, closer) = match stream
        .try_clone()
        .and_then(|a| Ok((a, stream.try_clone()?)))
    {
        Ok(c) => c,
        Err(e) => return Err(PostcopyError::Failed(e.into())),
    };
    // A destination that stops reading cannot hold the source forever.
    if let Err(e) = stream.set_write_timeout(Some(postcopy.peer_timeout)) {
        return Err(PostcopyError::Failed(e.into()));
    }
    let mut source = Source::new(stream, None);
    let mut vm = Throttled::new(vm);
    let (mut stranded, paused_at) = match switch_over(&mut source, &mut vm, options, postcopy) {
        Ok(s) => s,
        Err(e) => {
            let e = source.recover(&mut vm, e);
            tracing::warn!(error = ?e.to_string(), "postcopy failed before GO: the source runs on");
            return Err(PostcopyError::Failed(e));
        }
    };
    stranded.started = started;
    limit_send_buffer(source.ch.get_ref(), postcopy);
    let (tx, rx) = mpsc::channel();
    let reader = spawn_reader(reader_stream, tx);
    let result = serve(
        &mut *vm,
        &mut source.ch,
        &rx,
        &mut stranded,
        postcopy,
        Some(paused_at),
    );
    finish(&mut *vm, source.ch, closer, reader, stranded, result)
}

/// Continues an interrupted postcopy over a new connection to the same destination
/// (its [`Stranded::recover_over`]). `vm` is the paused source VM the interrupted
/// [`send_postcopy_over`] migrated.
pub fn recover_postcopy_over<M, S>(
    vm: &mut M,
    stream: S,
    stranded: Box<SourceStranded>,
    postcopy: &PostcopyOptions,
) -> Result<PostcopyReport, PostcopyError>
where
    M: Migratable + ?Sized,
    S: Duplex,
{
    let _span = tracing::info_span!("postcopy_recover").entered();
    let mut stranded = stranded;
    let clones = stream
        .try_clone()
        .and_then(|a| Ok((a, stream.try_clone()?)));
    let (reader_stream, closer) = match clones {
        Ok(c) => c,
        Err(e) => {
            stranded.reason = e.to_string();
            return Err(PostcopyError::Interrupted(stranded));
        }
    };
    stranded.report.recoveries += 1;
    let _ = stream.set_write_timeout(Some(postcopy.peer_timeout));
    limit_send_buffer(&stream, postcopy);
    let mut ch = Channel::new(stream);
    let (tx, rx) = mpsc::channel();
    let reader = spawn_reader(reader_stream, tx);
    let result = (|| {
        ch.send(&Message::Recover {
            session: stranded.session,
        })?;
        ch.flush()?;
        // The destination's list of missing pages replaces ours: pages in flight when
        // the connection broke may be lost.
        let mut unsent = PageMap::new(&layout_of(&stranded.pending));
        loop {
            match rx.recv_timeout(postcopy.peer_timeout) {
                Ok(FromDest::RecoverAck(last, ranges)) => {
                    for r in ranges {
                        let layout = layout_of(&stranded.pending);
                        if let Some((a, b)) = unsent.pages_of(&layout, r) {
                            for i in a..b {
                                if stranded.pending.get(i) {
                                    unsent.set(i);
                                }
                            }
                        }
                    }
                    if last {
                        break;
                    }
                }
                Ok(FromDest::Aborted(reason)) => return Err(MigrationError::PeerAborted(reason)),
                Ok(FromDest::Failed(e)) => return Err(e),
                Ok(other) => {
                    return Err(MigrationError::Malformed(format!(
                        "{other:?} before RECOVER_ACK"
                    )))
                }
                Err(_) => {
                    return Err(MigrationError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no RECOVER_ACK in time",
                    )))
                }
            }
        }
        tracing::info!(
            missing_bytes = unsent.count as u64 * PAGE_SIZE,
            "postcopy recovered: sending the pages the destination misses"
        );
        stranded.unsent = unsent;
        serve(&mut *vm, &mut ch, &rx, &mut stranded, postcopy, None)
    })();
    finish(vm, ch, closer, reader, stranded, result)
}

/// Caps the send buffer as `postcopy` says (a hint: failure only costs latency).
fn limit_send_buffer<S: Duplex>(stream: &S, postcopy: &PostcopyOptions) {
    if postcopy.send_buffer > 0 {
        if let Err(e) = stream.set_send_buffer(postcopy.send_buffer) {
            tracing::debug!(error = %e, "cannot cap the socket send buffer");
        }
    }
}

fn layout_of(map: &PageMap) -> Vec<MemoryRange> {
    map.regions.iter().map(|(r, _)| *r).collect()
}

/// Ends a serving connection: on success the source completes; on failure it stays
/// paused with its pages, stranded.
fn finish<M: Migratable + ?Sized, S: Duplex>(
    vm: &mut M,
    ch: Channel<S>,
    closer: S,
    reader: JoinHandle<()>,
    mut stranded: Box<SourceStranded>,
    result: Result<(), MigrationError>,
) -> Result<PostcopyReport, PostcopyError> {
    stranded.report.bytes_sent += ch.bytes_sent();
    let _ = closer.shutdown();
    let _ = reader.join();
    match result {
        Ok(()) => {
            if let Some(t) = stranded.postcopy_start {
                stranded.report.postcopy_time = t.elapsed();
            }
            stranded.report.total_time = stranded.started.elapsed();
            vm.stop_dirty_log()
                .map_err(|e| PostcopyError::Failed(e.into()))?;
            vm.complete_migration()
                .map_err(|e| PostcopyError::Failed(e.into()))?;
            tracing::info!(total = ?stranded.report.total_time, postcopy = ?stranded.report.postcopy_time, "postcopy completed");
            Ok(stranded.report)
        }
        Err(e) => {
            stranded.reason = e.to_string();
            tracing::error!(reason = ?stranded.reason, unsent_bytes = stranded.unsent.count as u64 * PAGE_SIZE,
                "postcopy interrupted: the source stays paused and keeps every page");
            Err(PostcopyError::Interrupted(stranded))
        }
    }
}

/// Handshake, rounds, pause, pending list, state, GO. Returns the stranded-to-be
/// state (everything pending unsent) and when the VM paused.
fn switch_over<M: Migratable + ?Sized, S: Duplex>(
    source: &mut Source<'_, S>,
    vm: &mut Throttled<'_, M>,
    options: &mut MigrationOptions,
    postcopy: &PostcopyOptions,
) -> Result<(Box<SourceStranded>, Instant), MigrationError> {
    options.features |= FEATURE_POSTCOPY;
    let (version, codec, features) = source.handshake(&**vm, options)?;
    if features & FEATURE_POSTCOPY == 0 {
        return Err(MigrationError::Rejected(format!(
            "the destination does not accept postcopy (protocol version {version}, features {features:#x})"
        )));
    }
    tracing::info!(version, codec = %codec.id(), features, "handshake accepted (postcopy)");
    vm.start_migration(MigrationRole::Source)?;
    vm.start_dirty_log()?;
    source.dirty_logging = true;
    let layout = vm.memory_source().regions();
    let mut buf = vec![0u8; 2 << 20];
    let mut all = MemoryRangeTable::new();
    for r in &layout {
        all.push(*r);
    }
    let mut rounds = vec![source.send_round(&**vm, &all, 0, false, version, &mut buf, options)?];
    for round in 1..=postcopy.precopy_rounds {
        let dirty = vm.dirty_log()?;
        rounds.push(source.send_round(&**vm, &dirty, round, false, version, &mut buf, options)?);
    }
    let paused_at = Instant::now();
    vm.pause()?;
    source.paused = true;
    vm.lift()?;
    let dirty = vm.dirty_log()?;
    let mut pending = PageMap::new(&layout);
    for r in dirty.ranges() {
        let (a, b) = pending.pages_of(&layout, *r).ok_or_else(|| {
            MigrationError::Malformed(format!("dirty range {r:x?} outside the layout"))
        })?;
        for i in a..b {
            pending.set(i);
        }
    }
    let session = session_id();
    let table = pending.to_table();
    let mut pieces = table.ranges().chunks(MAX_PENDING_RANGES).peekable();
    if pieces.peek().is_none() {
        source.ch.send(&Message::PostcopyPending {
            session,
            last: true,
            ranges: Vec::new(),
        })?;
    }
    while let Some(piece) = pieces.next() {
        source.ch.send(&Message::PostcopyPending {
            session,
            last: pieces.peek().is_none(),
            ranges: piece.to_vec(),
        })?;
    }
    tracing::info!(
        pending_bytes = pending.count as u64 * PAGE_SIZE,
        "paused; pending pages announced"
    );

    let mut snapshot = vm.snapshot()?;
    snapshot.encode(&codec)?;
    let state =
        codec::encode(codec.as_ref(), &snapshot).map_err(|source| MigratableError::Codec {
            path: snapshot.id().to_owned(),
            section: String::new(),
            source,
        })?;
    source.send_state(&state)?;
    source.ch.send(&Message::Go)?;
    source.ch.flush()?;
    source.committed = true;
    tracing::info!("GO sent: committed, the destination resumes the guest (postcopy)");
    let report = PostcopyReport {
        rounds,
        pending_bytes: pending.count as u64 * PAGE_SIZE,
        ..PostcopyReport::default()
    };
    Ok((
        Box::new(SourceStranded {
            session,
            unsent: pending.clone(),
            pending,
            report,
            started: Instant::now(),
            postcopy_start: None,
            reason: String::new(),
        }),
        paused_at,
    ))
}

/// A number naming this postcopy (not a secret: it only keeps two migrations apart).
fn session_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Serves requests first and pushes the rest until the destination says COMPLETE.
fn serve<M: Migratable + ?Sized, S: Duplex>(
    vm: &mut M,
    ch: &mut Channel<S>,
    rx: &Receiver<FromDest>,
    st: &mut SourceStranded,
    postcopy: &PostcopyOptions,
    paused_at: Option<Instant>,
) -> Result<(), MigrationError> {
    let layout = layout_of(&st.pending);
    let chunk_pages = (postcopy.push_chunk / PAGE_SIZE)
        .clamp(1, (MAX_REQUEST as u64 / PAGE_SIZE).max(1)) as usize;
    let mut buf = vec![0u8; (MAX_REQUEST as u64).max(chunk_pages as u64 * PAGE_SIZE) as usize];
    let mut cursor = 0usize;
    let mut complete = false;
    let handle = |msg: FromDest,
                  ch: &mut Channel<S>,
                  st: &mut SourceStranded,
                  buf: &mut [u8],
                  complete: &mut bool|
     -> Result<(), MigrationError> {
        match msg {
            FromDest::Done => {
                if let Some(p) = paused_at {
                    st.report.downtime = p.elapsed();
                }
                st.postcopy_start = Some(Instant::now());
                tracing::info!(downtime = ?st.report.downtime, "the destination resumed the guest");
            }
            FromDest::Request(gpa, length) => {
                let range = MemoryRange::new(gpa, u64::from(length));
                let pages = (length <= MAX_REQUEST)
                    .then(|| st.unsent.pages_of(&layout, range))
                    .flatten();
                let Some((a, b)) = pages else {
                    st.report.refused_requests += 1;
                    tracing::warn!(
                        gpa,
                        length,
                        "page request refused (outside the layout, unaligned or too large)"
                    );
                    return Ok(());
                };
                if (a..b).all(|i| !st.unsent.get(i)) {
                    st.report.repeated_requests += 1;
                    return Ok(());
                }
                st.report.requests += 1;
                let mut i = a;
                while i < b {
                    if !st.unsent.get(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < b && st.unsent.get(j) {
                        st.unsent.clear(j);
                        j += 1;
                    }
                    let bytes = (j - i) as u64 * PAGE_SIZE;
                    send_pages(&*vm, ch, st.unsent.gpa(i), &mut buf[..bytes as usize])?;
                    st.report.requested_bytes += bytes;
                    i = j;
                }
                ch.flush()?;
            }
            FromDest::Complete => *complete = true,
            FromDest::RecoverAck(..) => {
                return Err(MigrationError::Malformed(
                    "RECOVER_ACK while serving pages".into(),
                ))
            }
            FromDest::Aborted(reason) => return Err(MigrationError::PeerAborted(reason)),
            FromDest::Failed(e) => return Err(e),
        }
        Ok(())
    };
    while !complete {
        loop {
            match rx.try_recv() {
                Ok(msg) => {
                    handle(msg, ch, st, &mut buf, &mut complete)?;
                    if complete {
                        // A destination may close as soon as it sent COMPLETE: the
                        // reader then hangs up, which is no error any more.
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return Err(MigrationError::Io(io::ErrorKind::BrokenPipe.into()))
                }
            }
        }
        if complete {
            break;
        }
        if let Some(i) = st.unsent.next_set(cursor) {
            let end = st.unsent.region_end(i).min(i + chunk_pages);
            let mut j = i;
            while j < end && st.unsent.get(j) {
                st.unsent.clear(j);
                j += 1;
            }
            let bytes = (j - i) as u64 * PAGE_SIZE;
            send_pages(&*vm, ch, st.unsent.gpa(i), &mut buf[..bytes as usize])?;
            st.report.pushed_bytes += bytes;
            cursor = j;
        } else {
            ch.flush()?;
            match rx.recv_timeout(postcopy.peer_timeout) {
                Ok(msg) => handle(msg, ch, st, &mut buf, &mut complete)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrationError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the destination sent nothing in time",
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Io(io::ErrorKind::BrokenPipe.into()))
                }
            }
        }
    }
    Ok(())
}

/// Sends the pages at `gpa` (as many as `buf` holds): data as MEMORY, zero pages as
/// ZERO.
fn send_pages<M: Migratable + ?Sized, S: Duplex>(
    vm: &M,
    ch: &mut Channel<S>,
    gpa: u64,
    buf: &mut [u8],
) -> Result<(), MigrationError> {
    vm.memory_source()
        .read_memory(gpa, buf)
        .map_err(MigratableError::from)?;
    let mut zeros = Vec::new();
    for PageRun { offset, len, zero } in page_runs(buf) {
        let at = gpa + offset as u64;
        if zero {
            zeros.push(MemoryRange::new(at, len as u64));
        } else {
            ch.send(&Message::Memory {
                gpa: at,
                data: &buf[offset..offset + len],
            })?;
        }
    }
    if !zeros.is_empty() {
        ch.send(&Message::Zero(zeros))?;
    }
    Ok(())
}

/// What the destination received in a postcopy migration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyReceiveReport {
    /// Precopy rounds received.
    pub rounds: u32,
    /// Bytes of memory received before the switch-over.
    pub precopy_bytes: u64,
    /// Bytes of the pages pending at the switch-over.
    pub pending_bytes: u64,
    /// From GO to the guest running (restore was before READY).
    pub resume_time: Duration,
    /// Page requests sent (one per page the guest waited on).
    pub requests: u64,
    /// For each requested page that arrived: the time from its request to its
    /// placement (what a vCPU waited, minus the fault's own delivery).
    pub fault_latencies: Vec<Duration>,
    /// Pages that were missing because they were never written (zero) and placed
    /// as zeros on first access.
    pub zero_faults: u64,
    /// Connections that continued after an interruption.
    pub recoveries: u32,
    /// From GO to the last pending page.
    pub postcopy_time: Duration,
}

/// The destination's view of the pending pages, shared with its request thread.
#[derive(Debug)]
struct DestPages {
    layout: Vec<MemoryRange>,
    pending: PageMap,
    received: PageMap,
    requested: PageMap,
    /// Pending pages not received yet.
    remaining: usize,
    requested_at: HashMap<usize, Instant>,
    report: PostcopyReceiveReport,
}

fn lock(p: &Mutex<DestPages>) -> MutexGuard<'_, DestPages> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What [`receive_postcopy_over`] and the recoveries end with.
#[derive(Debug)]
pub enum Incoming<M> {
    /// Every page arrived: the VM runs with all of its memory.
    Complete(M, PostcopyReceiveReport),
    /// The connection broke during postcopy: the VM runs, its vCPUs waiting on the
    /// pages still missing. Recover ([`Stranded::recover_over`]) or give up.
    Stranded(Box<Stranded<M>>),
}

/// A destination whose postcopy was interrupted: the guest runs where it can, and any
/// vCPU that touches a missing page waits. Only the source has those pages.
pub struct Stranded<M> {
    vm: M,
    placer: Arc<dyn PagePlacer>,
    pages: Arc<Mutex<DestPages>>,
    faults: Receiver<u64>,
    session: u64,
    frame_timeout: Duration,
    handshake_timeout: Duration,
    go_at: Instant,
    reason: String,
}

impl<M> std::fmt::Debug for Stranded<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stranded")
            .field("session", &self.session)
            .field(
                "missing_bytes",
                &(lock(&self.pages).remaining as u64 * PAGE_SIZE),
            )
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl<M: Migratable + MissingPages> Stranded<M> {
    /// Why the connection ended.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Bytes of guest memory still missing.
    pub fn missing_bytes(&self) -> u64 {
        lock(&self.pages).remaining as u64 * PAGE_SIZE
    }

    /// The VM (running; vCPUs that touch a missing page wait).
    pub fn vm(&self) -> &M {
        &self.vm
    }

    /// Continues over a new connection from the source
    /// ([`recover_postcopy_over`]). A connection that is not a recovery of this
    /// session, or breaks again, leaves it stranded.
    pub fn recover_over<S: Duplex>(self: Box<Self>, stream: S) -> Incoming<M> {
        let _span = tracing::info_span!("postcopy_recover_in").entered();
        let mut this = self;
        let _ = stream.set_read_timeout(Some(this.frame_timeout));
        let _ = stream.set_write_timeout(Some(this.frame_timeout));
        let writer = match stream.try_clone() {
            Ok(w) => Arc::new(Mutex::new(Channel::new(w))),
            Err(e) => {
                this.reason = e.to_string();
                return Incoming::Stranded(this);
            }
        };
        let mut ch = Channel::new(stream);
        ch.set_frame_timeout(Some(this.handshake_timeout));
        let hello = match ch.recv() {
            Ok(Message::Recover { session }) if session == this.session => Ok(()),
            Ok(Message::Recover { .. }) => Err("RECOVER for another session".to_owned()),
            Ok(other) => Err(format!("{:?} instead of RECOVER", other.message_type())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = hello {
            tracing::warn!(reason = ?reason, "a connection that does not recover this postcopy");
            lock_ch(&writer).abort(&format!("destination: {reason}"));
            this.reason = reason;
            return Incoming::Stranded(this);
        }
        let sent = (|| {
            let p = lock(&this.pages);
            let mut missing = MemoryRangeTable::new();
            let mut outstanding = Vec::new();
            for i in 0..p.pending.pages {
                if p.pending.get(i) && !p.received.get(i) {
                    missing.push(MemoryRange::new(p.pending.gpa(i), PAGE_SIZE));
                    if p.requested.get(i) {
                        outstanding.push(p.pending.gpa(i));
                    }
                }
            }
            drop(p);
            let mut w = lock_ch(&writer);
            let mut pieces = missing.ranges().chunks(MAX_PENDING_RANGES).peekable();
            if pieces.peek().is_none() {
                w.send(&Message::RecoverAck {
                    last: true,
                    ranges: Vec::new(),
                })?;
            }
            while let Some(piece) = pieces.next() {
                w.send(&Message::RecoverAck {
                    last: pieces.peek().is_none(),
                    ranges: piece.to_vec(),
                })?;
            }
            // The vCPUs waiting on these asked once already: ask again.
            for gpa in outstanding {
                w.send(&Message::PageRequest {
                    gpa,
                    length: PAGE_SIZE as u32,
                })?;
            }
            w.flush()
        })();
        if let Err(e) = sent {
            this.reason = e.to_string();
            return Incoming::Stranded(this);
        }
        lock(&this.pages).report.recoveries += 1;
        tracing::info!(missing_bytes = this.missing_bytes(), "postcopy recovered");
        run_postcopy(*this, ch, writer)
    }

    /// Waits up to `timeout` for the source to reconnect on `listener` (`tcp://` or
    /// `unix://`) and recovers over that connection. Nobody in time:
    /// [`MigrationError::GuestLost`], and the VM is dropped — the pages it misses
    /// existed only on the source.
    pub fn recover_from(
        self: Box<Self>,
        listener: &Listener,
        timeout: Duration,
    ) -> Result<Incoming<M>, MigrationError> {
        let deadline = Instant::now() + timeout;
        let accepted: io::Result<Option<Stream>> = (|| match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false)?;
                            s.set_nodelay(true)?;
                            return Ok(Some(Stream::Tcp(s)));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false)?;
                            return Ok(Some(Stream::Unix(s)));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
            Listener::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "postcopy over tls:// is not supported yet",
            )),
        })();
        match accepted {
            Ok(Some(stream)) => Ok(self.recover_over(stream)),
            Ok(None) => {
                let missing = self.missing_bytes();
                let e = MigrationError::GuestLost(format!(
                    "no recovery within {timeout:?} after: {}; {missing} bytes of guest memory were only on the source",
                    self.reason
                ));
                tracing::error!(error = %e, "postcopy: the guest is lost");
                Err(e)
            }
            Err(e) => Err(MigrationError::GuestLost(format!(
                "cannot wait for a recovery ({e}) after: {}",
                self.reason
            ))),
        }
    }
}

fn lock_ch<S: Read + Write>(c: &Mutex<Channel<S>>) -> MutexGuard<'_, Channel<S>> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Receives a migration that may switch to postcopy, over a connected `stream`: as
/// [`receive_migration_over`](crate::destination::receive_migration_over), and if the
/// source announces pending pages, the VM is armed ([`MissingPages::arm_missing`]),
/// resumed on GO and its pages placed as they arrive. Errors before the VM resumed
/// drop the VM (ABORT sent); after, a broken connection is [`Incoming::Stranded`].
pub fn receive_postcopy_over<M, S, F>(
    stream: S,
    options: &ReceiveOptions,
    build: F,
) -> Result<Incoming<M>, MigrationError>
where
    M: Migratable + MissingPages,
    S: Duplex,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    let _span = tracing::info_span!("postcopy_in").entered();
    // A silent source ends a read (the frame deadline is checked when reads return).
    stream.set_read_timeout(Some(options.frame_timeout))?;
    stream.set_write_timeout(Some(options.frame_timeout))?;
    let writer_stream = stream.try_clone()?;
    let mut ch = Channel::new(stream);
    // This destination can take postcopy, whatever else `options` enables.
    let mut options = options.clone();
    options.features |= FEATURE_POSTCOPY;
    let (vm, armed) = match before_go(&mut ch, &options, build) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = ?e.to_string(), "incoming postcopy aborted");
            match &e {
                MigrationError::PeerAborted(_) => {}
                MigrationError::Rejected(reason) => ch.abort(reason),
                other => ch.abort(&format!("destination: {other}")),
            }
            return Err(e);
        }
    };
    let mut vm = vm;
    let writer = Arc::new(Mutex::new(Channel::new(writer_stream)));
    let go_at = Instant::now();
    let Some((placer, pages, faults, session)) = armed else {
        // Plain precopy: resume and DONE, as the precopy destination does.
        let resumed = vm.complete_migration().and_then(|_| vm.resume());
        if let Err(e) = resumed {
            ch.abort(&format!("destination: {e}"));
            return Err(e.into());
        }
        let mut w = lock_ch(&writer);
        let _ = w.send(&Message::Done).and_then(|_| w.flush());
        drop(w);
        let report = PostcopyReceiveReport {
            resume_time: go_at.elapsed(),
            ..PostcopyReceiveReport::default()
        };
        return Ok(Incoming::Complete(vm, report));
    };
    {
        // DONE before any page request: the writer is held across the resume.
        let mut w = lock_ch(&writer);
        if let Err(e) = vm.complete_migration().and_then(|_| vm.resume()) {
            drop(w);
            ch.abort(&format!("destination: {e}"));
            return Err(e.into());
        }
        lock(&pages).report.resume_time = go_at.elapsed();
        tracing::info!(resume = ?go_at.elapsed(), "GO received: the VM runs here, postcopy begins");
        if let Err(e) = w.send(&Message::Done).and_then(|_| w.flush()) {
            tracing::warn!(error = %e, "DONE not delivered");
        }
    }
    let stranded = Stranded {
        vm,
        placer,
        pages,
        faults,
        session,
        frame_timeout: options.frame_timeout,
        handshake_timeout: options.handshake_timeout,
        go_at,
        reason: String::new(),
    };
    Ok(run_postcopy(stranded, ch, writer))
}

type Armed = (
    Arc<dyn PagePlacer>,
    Arc<Mutex<DestPages>>,
    Receiver<u64>,
    u64,
);

/// HELLO to GO. Returns the VM and, for postcopy, what it was armed with.
fn before_go<M, S, F>(
    ch: &mut Channel<S>,
    options: &ReceiveOptions,
    build: F,
) -> Result<(M, Option<Armed>), MigrationError>
where
    M: Migratable + MissingPages,
    S: Duplex,
    F: FnOnce(&IncomingVm) -> Result<M, MigratableError>,
{
    ch.set_deadline(options.max_time.and_then(|t| Instant::now().checked_add(t)));
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
    let Negotiated {
        version,
        codec,
        features,
    } = negotiate(&hello, options)?;
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
    ch.send(&Message::HelloAck {
        version,
        codec: codec.id(),
        features,
    })?;
    ch.flush()?;

    let mut rounds = 0u32;
    let mut precopy_bytes = 0u64;
    let mut fresh = true;
    let mut state: Vec<u8> = Vec::new();
    let mut ready = false;
    // Postcopy: the pending pages, once the list is complete, and its session.
    let mut pending: Option<PageMap> = None;
    let mut listing: Option<(u64, PageMap)> = None;
    let mut armed: Option<Armed> = None;
    loop {
        let message = if ready {
            ch.recv()?
        } else {
            match ch.recv_into(vm.memory_sink(), &layout)? {
                Received::MemoryWritten(range) => {
                    if pending.is_some() || listing.is_some() {
                        return Err(MigrationError::Malformed(
                            "MEMORY after the pending list".into(),
                        ));
                    }
                    precopy_bytes = precopy_bytes.saturating_add(range.length);
                    continue;
                }
                Received::Message(message) => message,
            }
        };
        match message {
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            Message::Go if ready => break,
            Message::Go => {
                return Err(MigrationError::Unexpected {
                    got: MessageType::Go,
                    state: "receiving memory and state (no READY yet)",
                })
            }
            other if ready => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "waiting for GO after READY",
                })
            }
            Message::Zero(ranges) => {
                for r in ranges {
                    check_range(&layout, r)?;
                    if !fresh {
                        vm.memory_sink().zero_memory(r.gpa, r.length)?;
                    }
                }
            }
            Message::RoundEnd { round, .. } => {
                if round != rounds {
                    return Err(MigrationError::Malformed(format!(
                        "ROUND_END of round {round}, expected round {rounds}"
                    )));
                }
                fresh = false;
                rounds += 1;
            }
            Message::PostcopyPending {
                session,
                last,
                ranges,
            } => {
                if features & FEATURE_POSTCOPY == 0 {
                    return Err(MigrationError::Unexpected {
                        got: MessageType::PostcopyPending,
                        state: "receiving memory (postcopy was not negotiated)",
                    });
                }
                if pending.is_some() || rounds == 0 {
                    return Err(MigrationError::Malformed(
                        "POSTCOPY_PENDING out of place".into(),
                    ));
                }
                let (s, map) = listing.get_or_insert_with(|| (session, PageMap::new(&layout)));
                if *s != session {
                    return Err(MigrationError::Malformed(
                        "POSTCOPY_PENDING frames of two sessions".into(),
                    ));
                }
                for r in ranges {
                    let (a, b) = map.pages_of(&layout, r).ok_or_else(|| {
                        MigrationError::Malformed(format!(
                            "pending range {r:x?} is not whole pages of guest RAM"
                        ))
                    })?;
                    for i in a..b {
                        map.set(i);
                    }
                }
                if last {
                    let (s, map) = listing
                        .take()
                        .ok_or_else(|| MigrationError::Malformed("no pending list".into()))?;
                    tracing::info!(
                        pending_bytes = map.count as u64 * PAGE_SIZE,
                        session = s,
                        "pending pages announced"
                    );
                    pending = Some(map);
                    listing = Some((s, PageMap::new(&[])));
                }
            }
            Message::State { last, data } => {
                if state.len() + data.len() > MAX_STATE {
                    return Err(MigrationError::Malformed(format!(
                        "device state over the limit of {MAX_STATE} bytes"
                    )));
                }
                state.extend_from_slice(data);
                if last {
                    let mut snapshot: Snapshot =
                        codec::decode(codec.as_ref(), &state).map_err(|source| {
                            MigratableError::Codec {
                                path: String::new(),
                                section: "<state tree>".into(),
                                source,
                            }
                        })?;
                    snapshot.resolve_codecs(&options.codecs);
                    snapshot.check_codecs(&options.codecs)?;
                    vm.restore(&snapshot)?;
                    if let (Some(map), Some((session, _))) = (pending.take(), listing.take()) {
                        let (tx, rx) = mpsc::channel();
                        let placer = vm.arm_missing(&map.to_table(), tx)?;
                        let remaining = map.count;
                        let report = PostcopyReceiveReport {
                            rounds,
                            precopy_bytes,
                            pending_bytes: remaining as u64 * PAGE_SIZE,
                            ..PostcopyReceiveReport::default()
                        };
                        let pages = DestPages {
                            received: PageMap::new(&layout),
                            requested: PageMap::new(&layout),
                            pending: map,
                            layout: layout.clone(),
                            remaining,
                            requested_at: HashMap::new(),
                            report,
                        };
                        armed = Some((placer, Arc::new(Mutex::new(pages)), rx, session));
                    }
                    ch.send(&Message::Ready)?;
                    ch.flush()?;
                    ready = true;
                }
            }
            other => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "receiving memory and state",
                })
            }
        }
    }
    Ok((vm, armed))
}

/// The postcopy phase on one connection: pages in on `ch`, requests out on `writer`
/// (from the request thread).
fn run_postcopy<M: Migratable + MissingPages, S: Duplex>(
    stranded: Stranded<M>,
    mut ch: Channel<S>,
    writer: Arc<Mutex<Channel<S>>>,
) -> Incoming<M> {
    let Stranded {
        mut vm,
        placer,
        pages,
        faults,
        session,
        frame_timeout,
        handshake_timeout,
        go_at,
        reason: _,
    } = stranded;
    ch.set_deadline(None);
    ch.set_frame_timeout(Some(frame_timeout));
    let stop = Arc::new(AtomicBool::new(false));
    let requester = {
        let (pages, placer, writer, stop) =
            (pages.clone(), placer.clone(), writer.clone(), stop.clone());
        thread::spawn(move || request_pages(faults, &pages, &*placer, &writer, &stop))
    };
    let result = receive_pages(&mut ch, &pages, &*placer);
    stop.store(true, Ordering::Release);
    let faults = match requester.join() {
        Ok(f) => f,
        // The request thread never panics by design; if it did, no fault can be
        // served any more.
        Err(_) => mpsc::channel().1,
    };
    match result {
        Ok(()) => {
            if let Err(e) = vm.disarm_missing() {
                tracing::error!(error = %e, "cannot stop catching missing pages");
            }
            let mut w = lock_ch(&writer);
            if let Err(e) = w.send(&Message::PostcopyComplete).and_then(|_| w.flush()) {
                tracing::warn!(error = %e, "POSTCOPY_COMPLETE not delivered (every page is here)");
            }
            drop(w);
            let mut p = lock(&pages);
            p.report.postcopy_time = go_at.elapsed();
            let report = std::mem::take(&mut p.report);
            drop(p);
            tracing::info!(postcopy = ?report.postcopy_time, requests = report.requests, "postcopy complete: every page is here");
            Incoming::Complete(vm, report)
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::error!(reason = ?reason, missing_bytes = lock(&pages).remaining as u64 * PAGE_SIZE,
                "postcopy interrupted: vCPUs touching missing pages wait for a recovery");
            if let Ok(w) = writer.lock() {
                let _ = w.get_ref().shutdown();
            }
            Incoming::Stranded(Box::new(Stranded {
                vm,
                placer,
                pages,
                faults,
                session,
                frame_timeout,
                handshake_timeout,
                go_at,
                reason,
            }))
        }
    }
}

/// Places arriving pages until none is pending.
fn receive_pages<S: Duplex>(
    ch: &mut Channel<S>,
    pages: &Mutex<DestPages>,
    placer: &dyn PagePlacer,
) -> Result<(), MigrationError> {
    while lock(pages).remaining > 0 {
        match ch.recv()? {
            Message::Memory { gpa, data } => {
                let range = MemoryRange::new(gpa, data.len() as u64);
                let mut p = lock(pages);
                let (a, b) = p.pending.pages_of(&p.layout, range).ok_or_else(|| {
                    MigrationError::Malformed(format!(
                        "page data {range:x?} is not whole pages of guest RAM"
                    ))
                })?;
                place_run(&mut p, a, b, |i, j| {
                    let off = (i - a) * PAGE_SIZE as usize;
                    let end = (j - a) * PAGE_SIZE as usize;
                    placer.place(gpa + off as u64, &data[off..end])
                })?;
            }
            Message::Zero(ranges) => {
                let mut p = lock(pages);
                for r in ranges {
                    let (a, b) = p.pending.pages_of(&p.layout, r).ok_or_else(|| {
                        MigrationError::Malformed(format!(
                            "zero range {r:x?} is not whole pages of guest RAM"
                        ))
                    })?;
                    let base = r.gpa;
                    place_run(&mut p, a, b, |i, j| {
                        placer.place_zero(
                            base + (i - a) as u64 * PAGE_SIZE,
                            (j - i) as u64 * PAGE_SIZE,
                        )
                    })?;
                }
            }
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            other => {
                return Err(MigrationError::Unexpected {
                    got: other.message_type(),
                    state: "receiving postcopy pages",
                })
            }
        }
    }
    Ok(())
}

/// Places pages `a..b` that are pending and not received, in runs, and marks them.
/// Pages outside the pending set are ignored: the guest owns them now.
fn place_run(
    p: &mut DestPages,
    a: usize,
    b: usize,
    mut place: impl FnMut(usize, usize) -> Result<(), crate::memory::MemoryError>,
) -> Result<(), MigrationError> {
    let mut i = a;
    while i < b {
        if !p.pending.get(i) || p.received.get(i) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < b && p.pending.get(j) && !p.received.get(j) {
            j += 1;
        }
        place(i, j)?;
        let now = Instant::now();
        for k in i..j {
            p.received.set(k);
            p.remaining -= 1;
            if let Some(t) = p.requested_at.remove(&k) {
                p.report.fault_latencies.push(now - t);
            }
        }
        i = j;
    }
    Ok(())
}

/// The request thread: turns the VM's fault reports into PAGE_REQUESTs (once per
/// page), zero-fills pages that were never written, wakes waiters of pages that
/// arrived. Returns the fault receiver when told to stop.
fn request_pages<S: Duplex>(
    faults: Receiver<u64>,
    pages: &Mutex<DestPages>,
    placer: &dyn PagePlacer,
    writer: &Mutex<Channel<S>>,
    stop: &AtomicBool,
) -> Receiver<u64> {
    while !stop.load(Ordering::Acquire) {
        let gpa = match faults.recv_timeout(Duration::from_millis(20)) {
            Ok(gpa) => gpa,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut p = lock(pages);
        let Some(i) = p.pending.index(gpa) else {
            continue;
        };
        let page = p.pending.gpa(i);
        if p.received.get(i) {
            let _ = placer.wake(page, PAGE_SIZE);
        } else if !p.pending.get(i) {
            // Never written on the source (a zero page): no need to ask.
            if placer.place_zero(page, PAGE_SIZE).is_ok() {
                p.received.set(i);
                p.report.zero_faults += 1;
            }
        } else if p.requested.set(i) {
            p.requested_at.insert(i, Instant::now());
            p.report.requests += 1;
            drop(p);
            let mut w = lock_ch(writer);
            // A failure shows on the reading side too, which strands the postcopy.
            let _ = w
                .send(&Message::PageRequest {
                    gpa: page,
                    length: PAGE_SIZE as u32,
                })
                .and_then(|_| w.flush());
        }
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_maps_index_across_regions() {
        let layout = [
            MemoryRange::new(0, 0x4000),
            MemoryRange::new(0x10000, 0x2000),
        ];
        let mut m = PageMap::new(&layout);
        assert_eq!(m.pages, 6);
        assert_eq!(m.index(0x3fff), Some(3));
        assert_eq!(m.index(0x4000), None);
        assert_eq!(m.index(0x11000), Some(5));
        assert_eq!(m.gpa(4), 0x10000);
        assert_eq!(m.region_end(1), 4);
        assert_eq!(m.region_end(4), 6);
        assert_eq!(
            m.pages_of(&layout, MemoryRange::new(0x2000, 0x2000)),
            Some((2, 4))
        );
        assert_eq!(m.pages_of(&layout, MemoryRange::new(0x3000, 0x2000)), None);
        assert_eq!(m.pages_of(&layout, MemoryRange::new(0x1001, 0x1000)), None);
        assert!(m.set(3) && m.set(4) && !m.set(4));
        assert_eq!(m.count, 2);
        assert_eq!(m.next_set(5), Some(3));
        assert_eq!(
            m.to_table().ranges(),
            &[
                MemoryRange::new(0x3000, 0x1000),
                MemoryRange::new(0x10000, 0x1000)
            ]
        );
        assert!(m.clear(3) && !m.clear(3));
        assert_eq!(m.next_set(0), Some(4));
    }
}
