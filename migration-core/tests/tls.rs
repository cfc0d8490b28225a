//! Live migration and snapshot transfer over mutual TLS (`tls://`), and every way a
//! peer is refused: no client certificate, another CA, expired, not yet valid, wrong
//! server name, not on the allowlist, plaintext to TLS and TLS to plaintext, a byte
//! flipped in transit, a stalled handshake. Each refusal is named on both sides, the
//! destination never builds a VM for a refused peer, and the source VM runs on with
//! its memory and state intact. Certificates are made at test time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use migration_core::arch::Arch;
use migration_core::destination::receive_migration_with;
use migration_core::endpoint::Endpoint;
use migration_core::precopy::send_migration_with;
use migration_core::protocol::MigrationError;
use migration_core::security::{Security, SecurityError};
use migration_core::tls::{PeerIdentity, TlsConfig, TlsError};
use migration_core::transport::{recv_snapshot_secure, send_snapshot_secure};
use migration_core::{
    CodecRegistry, ConvergencePolicy, MigratableError, MigrationOptions, MigrationReport, Pausable,
    ReceiveOptions, ReceiveReport, Snapshot,
};
use migration_testkit::relay::{Direction, Relay, RelayAction, RelayFault};
use migration_testkit::test_pki::{TestCa, TestPki, Validity, TEST_CLIENT_NAME};
use migration_testkit::{assert_source_intact, FakeVm};

const MEM: u64 = 8 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn codecs() -> CodecRegistry {
    migration_serde::registry()
}

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

fn source_vm() -> (FakeVm, u64) {
    let mut vm = FakeVm::builder()
        .memory_size(MEM)
        .workload(0, 13)
        .codecs(codecs())
        .build()
        .expect("fake VM");
    vm.run_workload_writes(700).expect("workload writes");
    let digest = vm.paused_digest().expect("digest");
    (vm, digest)
}

type DestResult = Result<(FakeVm, ReceiveReport), MigrationError>;

/// A destination listening at `url` under `security` in a thread: the URL to connect
/// to, whether `build` was called, and its result.
struct Destination {
    url: String,
    built: Arc<AtomicBool>,
    handle: JoinHandle<DestResult>,
}

impl Destination {
    fn start(url: &str, security: Security) -> Self {
        let built = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let b = built.clone();
        let url = url.to_owned();
        let handle = thread::spawn(move || {
            receive_migration_with(
                &url,
                &security,
                &receive_options(),
                IO_TIMEOUT,
                |u| tx.send(u.to_owned()).expect("send URL"),
                |incoming| {
                    b.store(true, Ordering::SeqCst);
                    FakeVm::destination(&incoming.layout, codecs())
                },
            )
        });
        let url = rx.recv_timeout(IO_TIMEOUT).expect("destination listens");
        Self { url, built, handle }
    }

    fn addr(&self) -> SocketAddr {
        self.url
            .rsplit("://")
            .next()
            .and_then(|a| a.parse().ok())
            .expect("tcp address")
    }

    fn finish(self) -> (DestResult, bool) {
        let r = self.handle.join().expect("destination thread");
        (r, self.built.load(Ordering::SeqCst))
    }
}

fn migrate(
    url: &str,
    security: &Security,
    vm: &mut FakeVm,
) -> Result<MigrationReport, MigrationError> {
    send_migration_with(vm, url, security, &mut options(), IO_TIMEOUT)
}

fn tls_reason(e: &MigrationError) -> &TlsError {
    match e {
        MigrationError::Security(SecurityError::Tls(t)) => t,
        other => panic!("expected a TLS refusal, got: {other}"),
    }
}

fn peer_alert(e: &MigrationError) -> String {
    match tls_reason(e) {
        TlsError::PeerAlert { alert, .. } => alert.clone(),
        other => panic!("expected the peer's alert, got: {other}"),
    }
}

/// Runs one refused migration: the destination under `server`, the source under
/// `client`. Checks no VM was built and the source is intact; returns both errors.
fn refused(
    server: TlsConfig,
    client: TlsConfig,
    context: &str,
) -> (MigrationError, MigrationError) {
    let dest = Destination::start("tls://127.0.0.1:0", Security::tls(server));
    let (mut vm, digest) = source_vm();
    let src_err = migrate(&dest.url, &Security::tls(client), &mut vm).expect_err(context);
    let (dest_result, built) = dest.finish();
    let dest_err = dest_result.expect_err(context);
    assert!(
        !built,
        "{context}: the destination built a VM for a refused peer"
    );
    assert_source_intact(&mut vm, digest, context);
    (src_err, dest_err)
}

fn client_with(pki: &TestPki, cert: &migration_testkit::test_pki::TestCert) -> TlsConfig {
    pki.ca
        .config()
        .unwrap()
        .with_client_identity(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
        .unwrap()
}

#[test]
fn a_vm_migrates_over_mutual_tls_from_a_certificate_directory() {
    let pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    pki.write_dir(dir.path()).unwrap();
    let tls = Arc::new(TlsConfig::from_dir(dir.path()).unwrap());
    let dest = Destination::start("tls://127.0.0.1:0", Security::tls(tls.clone()));
    assert!(dest.url.starts_with("tls://127.0.0.1:"), "{}", dest.url);
    let (mut vm, _) = source_vm();
    let report = migrate(&dest.url, &Security::tls(tls), &mut vm).expect("migration over TLS");
    let (result, built) = dest.finish();
    let (mut moved, _) = result.expect("destination");
    assert!(built);
    assert!(report.rounds.len() >= 2);
    assert!(moved.is_running());
    moved.pause().unwrap();
    moved.verify().expect("destination self-check");
    vm.same_state(&moved).expect("same VM on both sides");
}

#[test]
fn allowlisted_peers_by_name_or_key_are_accepted() {
    let pki = TestPki::new().unwrap();
    // The client's SPKI hash, as `vmsnap` prints it.
    let client_der = pki.client.der.clone();
    let presented = PeerIdentity::of_certificate(&client_der).unwrap();
    assert!(presented.contains(&PeerIdentity::Name(TEST_CLIENT_NAME.into())));
    let spki = presented
        .iter()
        .find(|p| matches!(p, PeerIdentity::SpkiSha256(_)))
        .unwrap()
        .clone();
    let server_spki = PeerIdentity::of_certificate(&pki.server.der.clone())
        .unwrap()
        .pop()
        .unwrap();
    for allow in [PeerIdentity::Name("SOURCE.test".into()), spki] {
        let server = pki
            .server_config()
            .unwrap()
            .with_allowlist(vec![allow.clone()]);
        let client = pki
            .client_config()
            .unwrap()
            .with_allowlist(vec![server_spki.clone()]);
        let dest = Destination::start("tls://127.0.0.1:0", Security::tls(server));
        let (mut vm, _) = source_vm();
        migrate(&dest.url, &Security::tls(client), &mut vm)
            .unwrap_or_else(|e| panic!("{allow}: {e}"));
        dest.finish().0.expect("destination");
    }
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let pki = TestPki::new().unwrap();
    let (src, dest) = refused(
        pki.server_config().unwrap(),
        pki.ca.config().unwrap(),
        "no client cert",
    );
    assert!(
        matches!(tls_reason(&dest), TlsError::NoPeerCertificate),
        "{dest}"
    );
    assert_eq!(peer_alert(&src), "CertificateRequired", "{src}");
    assert!(
        src.to_string().contains("requires a client certificate"),
        "{src}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let pki = TestPki::new().unwrap();
    let other = TestCa::new("another CA").unwrap();
    let stranger = other.client(TEST_CLIENT_NAME, Validity::Valid).unwrap();
    let (src, dest) = refused(
        pki.server_config().unwrap(),
        client_with(&pki, &stranger),
        "other CA",
    );
    assert!(matches!(tls_reason(&dest), TlsError::UnknownCa), "{dest}");
    assert_eq!(peer_alert(&src), "UnknownCA", "{src}");

    // And the other way: a server whose certificate another CA signed.
    let impostor = other
        .server(&["localhost", "127.0.0.1"], Validity::Valid)
        .unwrap();
    let server = pki
        .ca
        .config()
        .unwrap()
        .with_server_identity(impostor.cert_pem.as_bytes(), impostor.key_pem.as_bytes())
        .unwrap();
    let (src, dest) = refused(
        server,
        pki.client_config().unwrap(),
        "server from another CA",
    );
    assert!(matches!(tls_reason(&src), TlsError::UnknownCa), "{src}");
    assert_eq!(peer_alert(&dest), "UnknownCA", "{dest}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let pki = TestPki::new().unwrap();
    let old = pki.ca.client(TEST_CLIENT_NAME, Validity::Expired).unwrap();
    let (src, dest) = refused(
        pki.server_config().unwrap(),
        client_with(&pki, &old),
        "expired",
    );
    assert!(matches!(tls_reason(&dest), TlsError::Expired), "{dest}");
    assert_eq!(peer_alert(&src), "CertificateExpired", "{src}");
}

#[test]
fn a_certificate_not_yet_valid_is_refused() {
    let pki = TestPki::new().unwrap();
    let early = pki
        .ca
        .client(TEST_CLIENT_NAME, Validity::NotYetValid)
        .unwrap();
    let (src, dest) = refused(
        pki.server_config().unwrap(),
        client_with(&pki, &early),
        "not yet valid",
    );
    assert!(matches!(tls_reason(&dest), TlsError::NotYetValid), "{dest}");
    assert_eq!(peer_alert(&src), "CertificateExpired", "{src}");
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let pki = TestPki::new().unwrap();
    let elsewhere = pki
        .ca
        .server(&["other-host.test"], Validity::Valid)
        .unwrap();
    let server = pki
        .ca
        .config()
        .unwrap()
        .with_server_identity(elsewhere.cert_pem.as_bytes(), elsewhere.key_pem.as_bytes())
        .unwrap();
    let (src, dest) = refused(server, pki.client_config().unwrap(), "wrong name");
    assert!(
        matches!(tls_reason(&src), TlsError::WrongName { expected } if expected == "127.0.0.1"),
        "{src}"
    );
    assert_eq!(peer_alert(&dest), "BadCertificate", "{dest}");

    // Naming the server explicitly makes the same certificate acceptable.
    let server = pki
        .ca
        .config()
        .unwrap()
        .with_server_identity(elsewhere.cert_pem.as_bytes(), elsewhere.key_pem.as_bytes())
        .unwrap();
    let dest = Destination::start("tls://127.0.0.1:0", Security::tls(server));
    let (mut vm, _) = source_vm();
    let client = pki
        .client_config()
        .unwrap()
        .with_server_name("other-host.test");
    migrate(&dest.url, &Security::tls(client), &mut vm).expect("with the server's name");
    dest.finish().0.expect("destination");
}

#[test]
fn a_valid_peer_not_on_the_allowlist_is_refused() {
    let pki = TestPki::new().unwrap();
    let server = pki
        .server_config()
        .unwrap()
        .with_allowlist(vec![PeerIdentity::Name("only-this-host.test".into())]);
    let (src, dest) = refused(server, pki.client_config().unwrap(), "allowlist");
    assert!(
        matches!(tls_reason(&dest), TlsError::NotAllowed { presented } if presented.contains("name:source.test")),
        "{dest}"
    );
    assert_eq!(peer_alert(&src), "AccessDenied", "{src}");
    assert!(src.to_string().contains("allowlist"), "{src}");

    // The source's allowlist of destinations works the same way.
    let client = pki
        .client_config()
        .unwrap()
        .with_allowlist(vec![PeerIdentity::SpkiSha256([7; 32])]);
    let (src, dest) = refused(pki.server_config().unwrap(), client, "server allowlist");
    assert!(
        matches!(tls_reason(&src), TlsError::NotAllowed { .. }),
        "{src}"
    );
    assert_eq!(peer_alert(&dest), "AccessDenied", "{dest}");
}

#[test]
fn a_plaintext_source_is_refused_by_a_tls_destination() {
    let pki = TestPki::new().unwrap();
    let dest = Destination::start(
        "tls://127.0.0.1:0",
        Security::tls(pki.server_config().unwrap()),
    );
    let plain_url = format!("tcp://{}", dest.addr());
    let (mut vm, digest) = source_vm();
    let src = migrate(&plain_url, &Security::plaintext(), &mut vm).expect_err("plaintext");
    let (result, built) = dest.finish();
    let dest_err = result.expect_err("plaintext");
    assert!(!built);
    assert!(
        matches!(tls_reason(&dest_err), TlsError::PlaintextPeer),
        "{dest_err}"
    );
    // The plaintext source reads an ABORT in its own protocol.
    assert!(
        matches!(&src, MigrationError::Refused(r) if r.contains("requires TLS")),
        "{src}"
    );
    assert_source_intact(&mut vm, digest, "plaintext source");
}

#[test]
fn a_tls_source_is_refused_by_a_plaintext_destination() {
    let pki = TestPki::new().unwrap();
    let dest = Destination::start("tcp://127.0.0.1:0", Security::plaintext());
    let tls_url = format!("tls://{}", dest.addr());
    let (mut vm, digest) = source_vm();
    let src = migrate(
        &tls_url,
        &Security::tls(pki.client_config().unwrap()),
        &mut vm,
    )
    .expect_err("TLS to plaintext");
    let (result, built) = dest.finish();
    let dest_err = result.expect_err("TLS to plaintext");
    assert!(!built);
    assert!(
        matches!(
            dest_err,
            MigrationError::Security(SecurityError::TlsPeerOnPlaintext)
        ),
        "{dest_err}"
    );
    assert!(
        matches!(
            tls_reason(&src),
            TlsError::HandshakeEof | TlsError::PeerNotTls
        ),
        "{src}"
    );
    assert_source_intact(&mut vm, digest, "TLS source, plaintext destination");
}

#[test]
fn a_byte_flipped_in_transit_is_detected_and_the_source_runs_on() {
    let pki = TestPki::new().unwrap();
    // A clean run through the relay measures the destination's answers: its last two
    // TLS records are READY and DONE (38 bytes each: 16-byte frame, 22 of TLS), so
    // 60 bytes before the end is inside READY, before the commit point.
    let dest = Destination::start(
        "tls://127.0.0.1:0",
        Security::tls(pki.server_config().unwrap()),
    );
    let relay = Relay::start(dest.addr(), None).unwrap();
    let (mut vm, _) = source_vm();
    migrate(
        &format!("tls://{}", relay.addr()),
        &Security::tls(pki.client_config().unwrap()),
        &mut vm,
    )
    .expect("clean run through the relay");
    dest.finish().0.expect("clean run");
    let to_client = relay.join().unwrap().to_client;

    for (direction, offset) in [
        (Direction::ToServer, 300_000),
        (Direction::ToClient, to_client - 60),
    ] {
        let context = format!("{direction:?} at {offset}");
        let dest = Destination::start(
            "tls://127.0.0.1:0",
            Security::tls(pki.server_config().unwrap()),
        );
        let relay = Relay::start(
            dest.addr(),
            Some(RelayFault {
                direction,
                offset,
                action: RelayAction::Flip(0x20),
            }),
        )
        .unwrap();
        let (mut vm, digest) = source_vm();
        let url = format!("tls://{}", relay.addr());
        let src = migrate(&url, &Security::tls(pki.client_config().unwrap()), &mut vm)
            .expect_err(&context);
        let (result, _) = dest.finish();
        let dest_err = result.expect_err(&context);
        let stats = relay.join().unwrap();
        assert!(stats.fault_applied, "{context}: {stats:?}");
        // The side that received the altered record names it; the other side reads the
        // alert (or a closed connection, if it was writing when the peer left).
        let (detector, other) = match direction {
            Direction::ToServer => (&dest_err, &src),
            Direction::ToClient => (&src, &dest_err),
        };
        assert!(
            detector.to_string().contains("bad record MAC"),
            "{context}: detector: {detector}"
        );
        eprintln!("{context}: other side: {other}");
        assert_source_intact(&mut vm, digest, &context);
    }
}

#[test]
fn a_stalled_handshake_times_out_on_both_sides() {
    let pki = TestPki::new().unwrap();
    let timeout = Duration::from_millis(500);

    // A client that connects and says nothing.
    let server = pki.server_config().unwrap().with_handshake_timeout(timeout);
    let dest = Destination::start("tls://127.0.0.1:0", Security::tls(server));
    let silent = TcpStream::connect(dest.addr()).unwrap();
    let started = Instant::now();
    let (result, built) = dest.finish();
    let err = result.expect_err("stalled client");
    assert!(!built);
    assert!(
        matches!(tls_reason(&err), TlsError::HandshakeTimeout(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < IO_TIMEOUT,
        "the handshake deadline, not the I/O timeout"
    );
    drop(silent);

    // A server that accepts and says nothing.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tls://{}", listener.local_addr().unwrap());
    let hold = thread::spawn(move || {
        let conn = listener.accept();
        thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let (mut vm, digest) = source_vm();
    let client = pki.client_config().unwrap().with_handshake_timeout(timeout);
    let err = migrate(&url, &Security::tls(client), &mut vm).expect_err("stalled server");
    assert!(
        matches!(tls_reason(&err), TlsError::HandshakeTimeout(_)),
        "{err}"
    );
    assert_source_intact(&mut vm, digest, "stalled server");
    hold.join().unwrap();
}

#[test]
fn plaintext_listening_is_loopback_only_unless_asked() {
    let err = receive_migration_with(
        "tcp://0.0.0.0:0",
        &Security::plaintext(),
        &receive_options(),
        IO_TIMEOUT,
        |_| panic!("must not listen"),
        |i| FakeVm::destination(&i.layout, codecs()),
    )
    .expect_err("plaintext on every interface");
    assert!(
        matches!(
            &err,
            MigrationError::Security(SecurityError::PlaintextRefused { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--insecure"), "{err}");
    // Opting in binds; loopback and unix need no opt-in.
    Endpoint::parse("tcp://0.0.0.0:0")
        .unwrap()
        .bind_with(&Security::insecure())
        .expect("insecure opt-in");
    Endpoint::parse("tcp://127.0.0.1:0")
        .unwrap()
        .bind()
        .expect("loopback");

    // One spelling: tls:// needs credentials, credentials need tls://.
    let pki = TestPki::new().unwrap();
    let no_creds = Endpoint::parse("tls://127.0.0.1:0")
        .unwrap()
        .bind_with(&Security::plaintext())
        .expect_err("tls:// without credentials");
    assert!(
        matches!(no_creds, SecurityError::TlsNotConfigured { .. }),
        "{no_creds}"
    );
    let mismatch = Endpoint::parse("tcp://127.0.0.1:0")
        .unwrap()
        .bind_with(&Security::tls(pki.server_config().unwrap()))
        .expect_err("credentials with tcp://");
    assert!(
        matches!(mismatch, SecurityError::TlsNotRequested { .. }),
        "{mismatch}"
    );
}

#[test]
fn snapshots_travel_over_tls_and_a_plaintext_sender_is_told_why_not() {
    let pki = TestPki::new().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tls://127.0.0.1:{port}");
    let server = Security::tls(pki.server_config().unwrap());
    let u = url.clone();
    let recv = thread::spawn(move || recv_snapshot_secure(&u, &codecs(), None, &server));
    let mut snapshot = Snapshot::new("vm");
    snapshot.add_state_as("answer", 1, 42u32);
    send_snapshot_secure(
        &snapshot,
        None,
        &url,
        &codecs(),
        &Security::tls(pki.client_config().unwrap()),
    )
    .expect("send over TLS");
    let got = recv.join().unwrap().expect("receive over TLS");
    assert_eq!(got.section("answer").unwrap().decode::<u32>().unwrap(), 42);

    // A plaintext sender to a TLS receiver: both refuse, the sender with the reason.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Security::tls(pki.server_config().unwrap());
    let u = format!("tls://127.0.0.1:{port}");
    let recv = thread::spawn(move || recv_snapshot_secure(&u, &codecs(), None, &server));
    let err = send_snapshot_secure(
        &snapshot,
        None,
        &format!("tcp://127.0.0.1:{port}"),
        &codecs(),
        &Security::plaintext(),
    )
    .expect_err("plaintext sender");
    assert!(err.to_string().contains("requires TLS"), "{err}");
    let recv_err = recv.join().unwrap().expect_err("plaintext sender");
    assert!(
        matches!(
            &recv_err,
            MigratableError::Security(SecurityError::Tls(TlsError::PlaintextPeer))
        ),
        "{recv_err}"
    );
}
