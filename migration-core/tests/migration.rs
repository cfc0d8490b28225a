//! Live migration of a fake VM through the protocol and the precopy driver, and the
//! fault matrix: at every message boundary of a migration, in both directions, a
//! disconnect or a corrupt byte leaves the source VM running with its memory and
//! state intact, and the destination releases its VM. The matrix runs over a unix
//! socket pair and over mutual TLS (certificates from `migration_testkit::test_pki`),
//! where it also cuts the connection inside the TLS handshake.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use migration_core::arch::Arch;
use migration_core::destination::receive_migration_with;
use migration_core::endpoint::{Endpoint, Stream};
use migration_core::precopy::send_migration_with;
use migration_core::protocol::{
    Channel, Message, MessageType, MigrationError, FEATURE_MULTI_CONNECTION, FEATURE_POSTCOPY,
    KNOWN_FEATURES, PROTOCOL_VERSION,
};
use migration_core::security::Security;
use migration_core::{
    receive_migration, receive_migration_over, send_migration, send_migration_over, CodecRegistry,
    ConvergencePolicy, MigratableError, MigrationOptions, MigrationReport, MigrationRole, Pausable,
    ReceiveOptions, ReceiveReport,
};
use migration_testkit::fault::{FaultPlan, FaultyStream};
use migration_testkit::relay::{Direction, Relay, RelayAction, RelayFault};
use migration_testkit::test_pki::TestPki;
use migration_testkit::{assert_source_intact, FakeVm};

const MEM: u64 = 8 << 20;

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

/// Options of every migration here but the one that tests convergence: forced to
/// complete, since whether a running VM's precopy converges under the limit depends
/// on the machine's speed (a debug build, a loaded host), which a test must not.
fn options() -> MigrationOptions {
    MigrationOptions {
        arch: Arch::None,
        downtime_limit: Duration::from_millis(100),
        policy: ConvergencePolicy::Force,
        ..MigrationOptions::default()
    }
}

fn receive_options() -> ReceiveOptions {
    ReceiveOptions::new(Arch::None, codecs())
}

/// A source VM with a deterministic memory image and an idle workload, so every run
/// produces the same byte stream.
fn idle_source() -> FakeVm {
    let vm = FakeVm::builder()
        .memory_size(MEM)
        .workload(0, 11)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    vm.run_workload_writes(700).expect("workload writes");
    vm
}

fn build_destination(layout: &[migration_core::MemoryRange]) -> Result<FakeVm, MigratableError> {
    FakeVm::destination(layout, codecs())
}

type DestResult = Result<(FakeVm, ReceiveReport), MigrationError>;

/// Runs a migration over a unix socket pair.
fn migrate(
    source: &mut FakeVm,
    options: &mut MigrationOptions,
) -> (Result<MigrationReport, MigrationError>, DestResult) {
    let (result, dest, _) = migrate_over(Transport::Unix, source, options, |s| s, |s| s);
    (result, dest)
}

#[test]
fn a_running_vm_migrates_and_continues() {
    let mut source = FakeVm::builder()
        .memory_size(32 << 20)
        .workload(64 << 20, 3)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    source.run_workload_writes(2000).expect("writes");
    thread::sleep(Duration::from_millis(50));
    let mut opts = options();
    let (result, dest) = migrate(&mut source, &mut opts);
    let report = result.expect("migration");
    let (mut dest, received) = dest.expect("destination");
    assert!(
        !source.is_running(),
        "source must stay paused after handing over"
    );
    assert!(dest.is_running(), "destination must run");
    // Each side was told which it is (a KvmVm refuses to run again only as a source).
    assert_eq!(source.migration_role(), Some(MigrationRole::Source));
    assert_eq!(dest.migration_role(), Some(MigrationRole::Destination));
    assert!(!source.is_migrating() && !dest.is_migrating());
    dest.pause().expect("pause destination");
    // The destination resumed at GO and its workload went on writing: it must pass
    // its self-check and have continued from exactly where the source stopped.
    dest.verify().expect("destination self-check");
    source.verify().expect("source self-check");
    assert!(dest.workload().writes >= source.workload().writes);
    assert!(
        report.rounds.len() >= 2,
        "round 0 and a final round: {report:?}"
    );
    assert_eq!(received.rounds as usize, report.rounds.len());
    assert_eq!(report.protocol_version, PROTOCOL_VERSION);
    assert_eq!(report.features, 0, "no feature offered, none accepted");
    assert!(report.downtime.total >= report.downtime.final_round);
}

#[test]
fn zero_pages_cost_a_few_bytes() {
    let mut source = idle_source();
    let mut opts = options();
    let (result, dest) = migrate(&mut source, &mut opts);
    let report = result.expect("migration");
    dest.expect("destination");
    let r0 = &report.rounds[0];
    assert!(r0.zero_pages > r0.pages, "{r0:?}");
    // Data pages cost a page each; zero pages at most a range entry each.
    assert!(
        r0.wire_bytes < (r0.pages + 1) * 4096 + r0.zero_pages * 16 + 4096,
        "{r0:?}"
    );
}

#[test]
fn a_destination_accepts_only_the_features_its_caller_enabled() {
    // Every known feature offered, none enabled on the destination: the migration
    // runs as plain precopy and the report says no feature was accepted.
    let mut source = idle_source();
    let mut opts = MigrationOptions {
        features: KNOWN_FEATURES,
        ..options()
    };
    let (result, dest) = migrate(&mut source, &mut opts);
    let report = result.expect("migration");
    let (mut dest, _) = dest.expect("destination");
    assert_eq!(report.features, 0);
    dest.pause().expect("pause");
    source.same_state(&dest).expect("same state");

    // At version 2 nothing is offered on the wire at all.
    let mut source = idle_source();
    let mut opts = MigrationOptions {
        protocol_version: 2,
        features: KNOWN_FEATURES,
        ..options()
    };
    let (result, dest) = migrate(&mut source, &mut opts);
    let report = result.expect("migration at version 2");
    dest.expect("destination");
    assert_eq!((report.protocol_version, report.features), (2, 0));
}

#[test]
fn a_source_refuses_a_feature_it_did_not_offer() {
    let mut source = idle_source();
    let digest = {
        source.pause().expect("pause");
        let d = source.content_digest();
        source.resume().expect("resume");
        d
    };
    let (a, b) = UnixStream::pair().expect("pair");
    // A destination that reads the HELLO and accepts postcopy, which was not offered.
    let dest = thread::spawn(move || {
        let mut ch = Channel::new(b);
        let codec = match ch.recv().expect("hello") {
            Message::Hello(h) => {
                assert_eq!(h.features, FEATURE_MULTI_CONNECTION);
                h.codecs[0]
            }
            other => panic!("{other:?}"),
        };
        ch.send(&Message::HelloAck {
            version: PROTOCOL_VERSION,
            codec,
            features: FEATURE_POSTCOPY,
        })
        .expect("ack");
        ch.flush().expect("flush");
    });
    let mut opts = MigrationOptions {
        features: FEATURE_MULTI_CONNECTION,
        ..options()
    };
    let err = send_migration_over(&mut source, a, &mut opts).expect_err("unoffered feature");
    assert!(
        matches!(&err, MigrationError::Rejected(r) if r.contains("accepted features 0x1")),
        "{err}"
    );
    dest.join().expect("destination thread");
    assert_source_intact(&mut source, digest, "unoffered feature");
}

#[test]
fn protocol_version_1_is_still_accepted() {
    let mut source = idle_source();
    let mut opts = MigrationOptions {
        protocol_version: 1,
        ..options()
    };
    let (result, dest) = migrate(&mut source, &mut opts);
    let report = result.expect("migration at version 1");
    let (mut dest, _) = dest.expect("destination");
    assert_eq!(report.protocol_version, 1);
    assert_eq!(
        report.rounds[0].zero_pages, 0,
        "version 1 has no zero ranges"
    );
    dest.pause().expect("pause");
    source.same_state(&dest).expect("same state");
}

#[test]
fn migrates_over_unix_and_tcp_urls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unix = format!("unix://{}", dir.path().join("mig.sock").display());
    for url in [unix.as_str(), "tcp://127.0.0.1:0"] {
        let mut source = idle_source();
        let (tx, rx) = std::sync::mpsc::channel();
        let listen = url.to_owned();
        let dest = thread::spawn(move || {
            receive_migration(
                &listen,
                &receive_options(),
                Duration::from_secs(20),
                |url| tx.send(url.to_owned()).expect("send url"),
                |incoming| build_destination(&incoming.layout),
            )
        });
        let target = rx.recv().expect("listening url");
        let report = send_migration(
            &mut source,
            &target,
            &mut options(),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        let (mut dest, _) = dest.join().expect("thread").expect("destination");
        dest.pause().expect("pause");
        source.same_state(&dest).expect("same state");
        assert!(report.bytes_sent > 0);
    }
}

#[test]
fn connect_refused_leaves_the_source_running() {
    let mut source = idle_source();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("unix://{}", dir.path().join("nobody.sock").display());
    let err = send_migration(&mut source, &url, &mut options(), Duration::from_secs(5))
        .expect_err("nobody listens");
    assert!(matches!(err, MigrationError::Io(_)), "{err}");
    assert!(source.is_running());
    assert!(!source.is_migrating());
}

#[test]
fn handshake_rejections_carry_the_destinations_reason() {
    // Architecture mismatch.
    let mut source = idle_source();
    let digest = source.paused_digest().expect("digest");
    let mut opts = MigrationOptions {
        arch: Arch::X86_64,
        ..options()
    };
    let (result, dest) = migrate(&mut source, &mut opts);
    let err = result.expect_err("arch mismatch");
    assert!(
        matches!(&err, MigrationError::Refused(r) if r.contains("architecture")),
        "{err}"
    );
    assert!(dest.is_err());
    assert_source_intact(&mut source, digest, "arch mismatch");

    // No common codec: the source offers only JSON, the destination has only postcard.
    let json_only = CodecRegistry::new().with(Arc::new(migration_serde::JsonCodec::default()));
    let mut source = FakeVm::builder()
        .memory_size(MEM)
        .codecs(json_only)
        .build()
        .expect("vm");
    let (a, b) = UnixStream::pair().expect("pair");
    let dest = thread::spawn(move || {
        let opts = ReceiveOptions::new(
            Arch::None,
            CodecRegistry::new().with(Arc::new(migration_serde::PostcardCodec)),
        );
        receive_migration_over(b, &opts, |i| build_destination(&i.layout))
    });
    let err = send_migration_over(&mut source, a, &mut options()).expect_err("no codec");
    assert!(
        matches!(&err, MigrationError::Refused(r) if r.contains("no common codec")),
        "{err}"
    );
    assert!(dest.join().expect("thread").is_err());
    assert!(source.is_running());

    // Layout mismatch: the destination builds another size.
    let mut source = idle_source();
    let (a, b) = UnixStream::pair().expect("pair");
    let dest = thread::spawn(move || {
        receive_migration_over(b, &receive_options(), |_| {
            FakeVm::destination(&[migration_core::MemoryRange::new(0, 4 << 20)], codecs())
        })
    });
    let err = send_migration_over(&mut source, a, &mut options()).expect_err("layout");
    assert!(
        matches!(&err, MigrationError::Refused(r) if r.contains("layout")),
        "{err}"
    );
    assert!(dest.join().expect("thread").is_err());
    assert!(source.is_running());

    // The destination cannot build the VM: the source's error says who refused and
    // why, each once, whether `build` returns `Build` or another error.
    for (built, why) in [
        (
            MigratableError::Build("out of memory".into()),
            "out of memory",
        ),
        (
            MigratableError::Integrity("bad config".into()),
            "integrity check failed: bad config",
        ),
    ] {
        let mut source = idle_source();
        let (a, b) = UnixStream::pair().expect("pair");
        let dest = thread::spawn(move || {
            receive_migration_over(b, &receive_options(), |_| Err::<FakeVm, _>(built))
        });
        let err = send_migration_over(&mut source, a, &mut options()).expect_err("no VM");
        assert_eq!(
            err.to_string(),
            format!("destination refused: cannot build the VM: {why}")
        );
        let dest_err = dest.join().expect("thread").expect_err("no VM");
        assert_eq!(
            dest_err.to_string(),
            format!("handshake rejected: cannot build the VM: {why}")
        );
        assert!(source.is_running());
    }
}

#[test]
fn a_restore_error_on_the_destination_resumes_the_source() {
    let (mut source, digest) = source_and_digest();
    let (a, b) = UnixStream::pair().expect("pair");
    let dest = thread::spawn(move || {
        // A destination whose device tree lacks the source's devices.
        receive_migration_over(b, &receive_options(), |i| {
            FakeVm::builder()
                .regions(&i.layout)
                .devices(migration_testkit::FakeDeviceManager::new())
                .codecs(codecs())
                .paused()
                .build()
        })
    });
    let err = send_migration_over(&mut source, a, &mut options()).expect_err("restore fails");
    assert!(
        matches!(&err, MigrationError::PeerAborted(r) if r.contains("restore")),
        "{err}"
    );
    assert!(dest.join().expect("thread").is_err());
    assert_source_intact(&mut source, digest, "restore error");
}

/// A fake VM whose dirty log always holds a page: a guest that never converges,
/// independent of how threads are scheduled.
struct NeverConverges(FakeVm);

impl Pausable for NeverConverges {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), MigratableError> {
        self.0.resume()
    }
}

impl migration_core::Snapshottable for NeverConverges {
    fn id(&self) -> String {
        self.0.id()
    }
    fn snapshot(&mut self) -> Result<migration_core::Snapshot, MigratableError> {
        self.0.snapshot()
    }
    fn restore(&mut self, s: &migration_core::Snapshot) -> Result<(), MigratableError> {
        self.0.restore(s)
    }
}

impl migration_core::Transportable for NeverConverges {
    fn codecs(&self) -> &CodecRegistry {
        self.0.codecs()
    }
}

impl migration_core::Migratable for NeverConverges {
    fn start_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.0.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), MigratableError> {
        self.0.stop_dirty_log()
    }
    fn dirty_log(&mut self) -> Result<migration_core::MemoryRangeTable, MigratableError> {
        let mut dirty = self.0.dirty_log()?;
        dirty.push(migration_core::MemoryRange::new(12 << 20, 4096));
        Ok(dirty)
    }
    fn start_migration(
        &mut self,
        role: migration_core::MigrationRole,
    ) -> Result<(), MigratableError> {
        self.0.start_migration(role)
    }
    fn complete_migration(&mut self) -> Result<(), MigratableError> {
        self.0.complete_migration()
    }
    fn memory_source(&self) -> &dyn migration_core::MemorySource {
        self.0.memory_source()
    }
    fn memory_sink(&self) -> &dyn migration_core::MemorySink {
        self.0.memory_sink()
    }
}

#[test]
fn not_converging_cancels_or_forces_as_asked() {
    for policy in [ConvergencePolicy::Cancel, ConvergencePolicy::Force] {
        let vm = FakeVm::builder()
            .memory_size(16 << 20)
            .workload(64 << 20, 5)
            .codecs(codecs())
            .build()
            .expect("vm");
        let mut source = NeverConverges(vm);
        let mut opts = MigrationOptions {
            downtime_limit: Duration::ZERO,
            max_rounds: 2,
            policy,
            ..options()
        };
        let (a, b) = UnixStream::pair().expect("socketpair");
        let dest = thread::spawn(move || {
            receive_migration_over(b, &receive_options(), |incoming| {
                build_destination(&incoming.layout)
            })
        });
        let result = send_migration_over(&mut source, a, &mut opts);
        let dest = dest.join().expect("destination thread");
        match policy {
            ConvergencePolicy::Cancel => {
                let err = result.expect_err("cancel");
                assert!(matches!(err, MigrationError::NotConverged(_)), "{err}");
                assert!(dest.is_err());
                assert!(source.0.is_running());
                assert!(!source.0.is_dirty_logging());
            }
            ConvergencePolicy::Force => {
                let report = result.expect("forced");
                assert!(!report.converged);
                assert_eq!(report.rounds.len(), 4, "round 0, two capped rounds, final");
                let (mut dest, _) = dest.expect("destination");
                dest.pause().expect("pause");
                dest.verify().expect("self-check");
                assert!(dest.workload().writes >= source.0.workload().writes);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The fault matrix, over each transport.

/// What the matrix runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// A unix socket pair.
    Unix,
    /// Loopback TCP under mutual TLS: the faults below apply to the plaintext inside
    /// TLS, and [`tls_handshake_cuts`] cuts the TCP stream inside the handshake.
    Tls,
}

/// Certificates for every TLS case (made once: key generation is not free).
fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| TestPki::new().expect("test certificates"))
}

fn server_security() -> Security {
    Security::tls(pki().server_config().expect("server config"))
}

fn client_security() -> Security {
    Security::tls(pki().client_config().expect("client config"))
}

/// A connected pair over `transport`: (source end, destination end), both with a
/// 20 s read timeout.
fn connected_pair(transport: Transport) -> (Stream, Stream) {
    // Only a guard against a hang: a debug build on a loaded 2-core machine was seen
    // to leave the destination waiting over 20 s for a frame of a running VM's rounds.
    let timeout = Some(Duration::from_secs(60));
    match transport {
        Transport::Unix => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            for s in [&a, &b] {
                s.set_read_timeout(timeout).expect("timeout");
            }
            (Stream::Unix(a), Stream::Unix(b))
        }
        Transport::Tls => {
            let server = server_security();
            let listener = Endpoint::parse("tls://127.0.0.1:0")
                .expect("url")
                .bind_with(&server)
                .expect("listen");
            let url = listener.url().expect("url");
            let dest = thread::spawn(move || listener.accept_with(&server, timeout, |_, _| {}));
            let src = Endpoint::parse(&url)
                .expect("url")
                .connect_with(&client_security(), timeout)
                .expect("TLS connect");
            let dest = dest.join().expect("accept thread").expect("TLS accept");
            (src, dest)
        }
    }
}

/// Shuts the socket under `s` down both ways (under TLS, the TCP socket).
fn shutdown(s: &Stream) {
    let _ = match s {
        Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        Stream::Tls(s) => s.tcp().shutdown(Shutdown::Both),
        Stream::Unix(s) => s.shutdown(Shutdown::Both),
    };
}

/// A migration over `transport`, each end wrapped by `wrap_src`/`wrap_dst`: the
/// results of both sides, and whether the destination called `build`.
fn migrate_over<A, B>(
    transport: Transport,
    source: &mut FakeVm,
    options: &mut MigrationOptions,
    wrap_src: impl FnOnce(Stream) -> A,
    wrap_dst: impl FnOnce(Stream) -> B + Send + 'static,
) -> (Result<MigrationReport, MigrationError>, DestResult, bool)
where
    A: Read + Write,
    B: Read + Write + 'static,
{
    let (a, b) = connected_pair(transport);
    let built = Arc::new(AtomicBool::new(false));
    let flag = built.clone();
    let dest = thread::spawn(move || {
        receive_migration_over(wrap_dst(b), &receive_options(), |incoming| {
            flag.store(true, Ordering::SeqCst);
            build_destination(&incoming.layout)
        })
    });
    let result = send_migration_over(source, wrap_src(a), options);
    let dest = dest.join().expect("destination thread");
    (result, dest, built.load(Ordering::SeqCst))
}

/// Records what passes through a stream in each direction.
struct Recorder<S> {
    inner: S,
    written: Arc<Mutex<Vec<u8>>>,
    read: Arc<Mutex<Vec<u8>>>,
}

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.lock().expect("lock").extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written
            .lock()
            .expect("lock")
            .extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A source-side disconnect: after `at` bytes written, the socket is shut down.
struct Disconnect {
    inner: Stream,
    at: u64,
    pos: u64,
}

impl Read for Disconnect {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Disconnect {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos >= self.at {
            let _ = self.inner.flush();
            shutdown(&self.inner);
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "disconnected"));
        }
        let n = buf.len().min((self.at - self.pos) as usize);
        let n = self.inner.write(&buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Frame boundaries of a recorded stream: `(offset, type)` of each frame start.
fn frames(stream: &[u8]) -> Vec<(u64, u16)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= stream.len() {
        let ty = u16::from_le_bytes([stream[pos], stream[pos + 1]]);
        let len = u32::from_le_bytes([
            stream[pos + 4],
            stream[pos + 5],
            stream[pos + 6],
            stream[pos + 7],
        ]);
        out.push((pos as u64, ty));
        pos += 8 + len as usize + 8;
    }
    assert_eq!(
        pos,
        stream.len(),
        "recorded stream is a whole number of frames"
    );
    out
}

fn recorded_run(transport: Transport) -> (Vec<u8>, Vec<u8>) {
    let mut source = idle_source();
    let written = Arc::new(Mutex::new(Vec::new()));
    let read = Arc::new(Mutex::new(Vec::new()));
    let (w, r) = (written.clone(), read.clone());
    let (result, dest, _) = migrate_over(
        transport,
        &mut source,
        &mut options(),
        move |inner| Recorder {
            inner,
            written: w,
            read: r,
        },
        |s| s,
    );
    result.expect("clean migration");
    dest.expect("clean destination");
    let w = written.lock().expect("lock").clone();
    let r = read.lock().expect("lock").clone();
    (w, r)
}

fn is_commit_point(ty: u16) -> bool {
    ty == MessageType::Done as u16
}

/// An idle source and its digest taken while paused.
fn source_and_digest() -> (FakeVm, u64) {
    let mut source = idle_source();
    let digest = source.paused_digest().expect("digest");
    (source, digest)
}

/// The first and the last frame of each type, and the first two of the stream: every
/// kind of boundary, without each of the hundreds of MEMORY frames.
fn each_kind(frames: &[(u64, u16)]) -> Vec<(u64, u16)> {
    let mut keep: Vec<(u64, u16)> = frames.iter().take(2).copied().collect();
    for &(_, ty) in frames {
        let mut of_type = frames.iter().filter(|f| f.1 == ty);
        for f in [of_type.clone().next(), of_type.next_back()]
            .into_iter()
            .flatten()
        {
            if !keep.contains(f) {
                keep.push(*f);
            }
        }
    }
    keep.sort_unstable();
    keep
}

/// The fault matrix over `transport`, at every frame boundary or (`every_frame`
/// false) at the boundaries [`each_kind`] picks; returns the number of cases run.
fn fault_matrix(transport: Transport, every_frame: bool) -> usize {
    let (to_dest, to_source) = recorded_run(transport);
    let all_frames = frames(&to_dest);
    let dst_frames = frames(&to_source);
    assert!(
        all_frames.len() >= 6,
        "HELLO, memory, ROUND_ENDs, STATE, GO: {all_frames:?}"
    );
    assert_eq!(dst_frames.len(), 3, "HELLO_ACK, READY, DONE");
    // The destination has no whole HELLO before this byte: it must not build a VM.
    let hello_end = all_frames[1].0;
    let src_frames = if every_frame {
        all_frames
    } else {
        each_kind(&all_frames)
    };

    let mut cases = 0;
    // 1. The source's connection drops at every frame boundary and mid-frame.
    for &(offset, ty) in &src_frames {
        for at in [offset, offset + 5] {
            let (mut source, digest) = source_and_digest();
            let ctx = format!("{transport:?}: source disconnect at byte {at} (frame type {ty})");
            let (result, dest, built) = migrate_over(
                transport,
                &mut source,
                &mut options(),
                move |inner| Disconnect { inner, at, pos: 0 },
                |s| s,
            );
            // A cut at or inside GO means GO never fully left: still before the
            // commit point, so the source must resume.
            let err = result.expect_err(&ctx);
            assert!(
                !matches!(err, MigrationError::CommitUncertain),
                "{ctx}: {err}"
            );
            let dest_err = dest.expect_err(&format!("{ctx}: destination must release its VM"));
            assert!(!dest_err.to_string().is_empty(), "{ctx}");
            if at < hello_end {
                assert!(!built, "{ctx}: built a VM without a whole HELLO");
            }
            assert_source_intact(&mut source, digest, &ctx);
            cases += 1;
        }
    }

    // 2. The destination's view of the stream ends, or is corrupted, at every frame.
    for &(offset, ty) in &src_frames {
        let plans = [
            ("truncate", FaultPlan::new().truncate_at(offset)),
            ("flip", FaultPlan::new().flip_bit((offset + 9) * 8 + 3)),
        ];
        for (what, plan) in plans {
            let (mut source, digest) = source_and_digest();
            let ctx = format!(
                "{transport:?}: destination {what} at byte {offset} (frame type {ty}): {plan}"
            );
            let (result, dest, built) = migrate_over(
                transport,
                &mut source,
                &mut options(),
                |s| s,
                move |inner| FaultyStream::reads(inner, plan),
            );
            let err = result.expect_err(&ctx);
            let dest_err = dest.expect_err(&format!("{ctx}: destination must fail"));
            if what == "flip" {
                assert!(
                    matches!(dest_err, MigrationError::Checksum(_)),
                    "{ctx}: {dest_err}"
                );
                match &err {
                    MigrationError::PeerAborted(r) | MigrationError::Refused(r) => {
                        assert!(r.contains("checksum"), "{ctx}: {err}")
                    }
                    // Over TCP the destination's close resets a connection the source
                    // still writes to, and the reset discards the ABORT waiting to be
                    // read: the source then names the connection.
                    MigrationError::Io(_) if transport == Transport::Tls => {}
                    other => panic!("{ctx}: expected the destination's reason, got {other}"),
                }
            }
            if offset < hello_end {
                assert!(!built, "{ctx}: built a VM without a whole HELLO");
            }
            assert_source_intact(&mut source, digest, &ctx);
            cases += 1;
        }
    }

    // 3. The source's view of the destination's replies ends or is corrupted.
    for &(offset, ty) in &dst_frames {
        let plans = [
            ("truncate", FaultPlan::new().truncate_at(offset)),
            ("flip", FaultPlan::new().flip_bit(offset * 8 + 1)),
        ];
        for (what, plan) in plans {
            let (mut source, digest) = source_and_digest();
            let ctx = format!(
                "{transport:?}: source-side {what} at reply byte {offset} (frame type {ty})"
            );
            let (result, dest, _) = migrate_over(
                transport,
                &mut source,
                &mut options(),
                move |inner| FaultyStream::reads(inner, plan),
                |s| s,
            );
            let err = result.expect_err(&ctx);
            if is_commit_point(ty) {
                // DONE lost: the destination resumed; the source must not.
                assert!(
                    matches!(err, MigrationError::CommitUncertain),
                    "{ctx}: {err}"
                );
                assert!(!source.is_running(), "{ctx}: two copies would run");
                let (dest, _) = dest.expect("destination resumed on GO");
                assert!(dest.is_running());
            } else {
                if what == "flip" {
                    // A flipped header bit is a malformed frame; elsewhere, its checksum.
                    assert!(
                        matches!(
                            err,
                            MigrationError::Checksum(_) | MigrationError::Malformed(_)
                        ),
                        "{ctx}: {err}"
                    );
                }
                assert!(dest.is_err(), "{ctx}: destination must release its VM");
                assert_source_intact(&mut source, digest, &ctx);
            }
            cases += 1;
        }
    }
    eprintln!("fault matrix over {transport:?}: {cases} cases");
    cases
}

#[test]
fn fault_matrix_source_survives_every_boundary() {
    let cases = fault_matrix(Transport::Unix, true);
    assert!(cases >= 30, "{cases} cases");
}

/// The matrix over mutual TLS at every kind of frame boundary (the first and last of
/// each type); `fault_matrix_over_tls_at_every_boundary` runs all of them.
#[test]
fn fault_matrix_over_tls_source_survives_each_kind_of_boundary() {
    let cases = fault_matrix(Transport::Tls, false);
    assert!(cases >= 30, "{cases} cases");
}

#[test]
#[ignore = "long: a TLS migration per frame boundary; each kind of boundary runs in CI"]
fn fault_matrix_over_tls_at_every_boundary() {
    let cases = fault_matrix(Transport::Tls, true);
    assert!(cases >= 30, "{cases} cases");
}

/// The bytes each side of a bare TLS connection sends in its handshake (with the
/// listener's authorization token), measured through a relay: (to server, to client).
fn tls_handshake_bytes() -> (u64, u64) {
    let server = server_security();
    let listener = Endpoint::parse("tls://127.0.0.1:0")
        .expect("url")
        .bind_with(&server)
        .expect("listen");
    let url = listener.url().expect("url");
    let addr = url.trim_start_matches("tls://").parse().expect("address");
    let relay = Relay::start(addr, None).expect("relay");
    let target = format!("tls://{}", relay.addr());
    let client = thread::spawn(move || {
        Endpoint::parse(&target)
            .expect("url")
            .connect_with(&client_security(), Some(Duration::from_secs(20)))
    });
    let dest = listener
        .accept_with(&server, Some(Duration::from_secs(20)), |_, _| {})
        .expect("accept");
    let src = client.join().expect("thread").expect("connect");
    drop((src, dest));
    let stats = relay.join().expect("relay");
    (stats.to_server, stats.to_client)
}

/// A TLS connection cut inside its handshake, in either direction: both sides fail
/// naming TLS, the destination never builds a VM, the source runs on intact.
#[test]
fn fault_matrix_over_tls_cuts_inside_the_handshake() {
    let (to_server, to_client) = tls_handshake_bytes();
    assert!(
        to_server > 100 && to_client > 100,
        "{to_server} {to_client}"
    );
    let mut cases = 0;
    for (direction, total) in [
        (Direction::ToServer, to_server),
        (Direction::ToClient, to_client),
    ] {
        // The totals include the close_notify alerts sent when the measuring
        // connection closed: stay well inside the handshake.
        for offset in [0, 1, total / 3, total / 2, total * 2 / 3] {
            let ctx = format!("TLS handshake cut {direction:?} at byte {offset} of {total}");
            let (tx, rx) = mpsc::channel();
            let built = Arc::new(AtomicBool::new(false));
            let flag = built.clone();
            let dest = thread::spawn(move || {
                receive_migration_with(
                    "tls://127.0.0.1:0",
                    &server_security(),
                    &receive_options(),
                    Duration::from_secs(20),
                    |url| tx.send(url.to_owned()).expect("send url"),
                    |incoming| {
                        flag.store(true, Ordering::SeqCst);
                        build_destination(&incoming.layout)
                    },
                )
            });
            let url = rx.recv().expect("listening");
            let addr = url.trim_start_matches("tls://").parse().expect("address");
            let relay = Relay::start(
                addr,
                Some(RelayFault {
                    direction,
                    offset,
                    action: RelayAction::Cut,
                }),
            )
            .expect("relay");
            let (mut source, digest) = source_and_digest();
            let err = send_migration_with(
                &mut source,
                &format!("tls://{}", relay.addr()),
                &client_security(),
                &mut options(),
                Duration::from_secs(20),
            )
            .expect_err(&ctx);
            let dest_err = dest.join().expect("destination thread").expect_err(&ctx);
            let stats = relay.join().expect("relay");
            assert!(stats.fault_applied, "{ctx}: {stats:?}");
            assert!(!built.load(Ordering::SeqCst), "{ctx}: built a VM");
            // Both name the TLS layer (or the connection it ran on).
            for (side, e) in [("source", &err), ("destination", &dest_err)] {
                assert!(
                    matches!(e, MigrationError::Security(_) | MigrationError::Io(_)),
                    "{ctx}: {side}: {e}"
                );
            }
            assert_source_intact(&mut source, digest, &ctx);
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
}

// ---------------------------------------------------------------------------------
// The destination's order of frames.

/// A source that replays recorded bytes and swallows the destination's replies.
struct Replay(io::Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The recorded source stream re-cut by `edit`, which gets its frames (type, bytes).
fn replayed(edit: impl FnOnce(&mut Vec<(u16, Vec<u8>)>)) -> DestResult {
    let (to_dest, _) = recorded_run(Transport::Unix);
    let starts = frames(&to_dest);
    let mut cut: Vec<(u16, Vec<u8>)> = starts
        .iter()
        .enumerate()
        .map(|(i, &(at, ty))| {
            let end = starts.get(i + 1).map_or(to_dest.len(), |n| n.0 as usize);
            (ty, to_dest[at as usize..end].to_vec())
        })
        .collect();
    edit(&mut cut);
    let stream: Vec<u8> = cut.into_iter().flat_map(|(_, b)| b).collect();
    receive_migration_over(
        Replay(io::Cursor::new(stream)),
        &receive_options(),
        |incoming| build_destination(&incoming.layout),
    )
}

fn position(cut: &[(u16, Vec<u8>)], ty: MessageType) -> usize {
    cut.iter()
        .position(|(t, _)| *t == ty as u16)
        .expect("frame in the recording")
}

#[test]
fn the_destination_refuses_frames_out_of_order() {
    // The recording itself is accepted.
    replayed(|_| {}).expect("the recorded stream");

    // GO before the state: the VM was never restored and must not resume.
    let early_go = replayed(|cut| {
        let go = cut.remove(position(cut, MessageType::Go));
        cut.insert(position(cut, MessageType::State), go);
    });
    assert!(
        matches!(
            early_go,
            Err(MigrationError::Unexpected {
                got: MessageType::Go,
                ..
            })
        ),
        "{early_go:?}"
    );

    // Memory after READY (between the last STATE and GO): nothing may change any more.
    let late_memory = replayed(|cut| {
        let memory = cut[position(cut, MessageType::Memory)].clone();
        cut.insert(position(cut, MessageType::Go), memory);
    });
    assert!(
        matches!(
            late_memory,
            Err(MigrationError::Unexpected {
                got: MessageType::Memory,
                ..
            })
        ),
        "{late_memory:?}"
    );

    // A round announced twice.
    let repeated_round = replayed(|cut| {
        let end = cut[position(cut, MessageType::RoundEnd)].clone();
        cut.insert(position(cut, MessageType::RoundEnd), end);
    });
    assert!(
        matches!(repeated_round, Err(MigrationError::Malformed(_))),
        "{repeated_round:?}"
    );
}
