//! Live migration of a fake VM between two processes on two "hosts": two network
//! namespaces joined by a veth pair shaped to 1 Gbit/s (plus 1 ms delay per end where
//! the kernel has netem). The test re-runs this binary in each namespace: the
//! destination helper listens, builds the VM, receives it and runs its self-check;
//! the source helper migrates a VM whose workload dirties memory throughout.
//!
//! The test asserts what it controls: the handover (the source stays paused and
//! passes its self-check) and the workload's continuity on the destination. Whether
//! precopy converges under the downtime limit depends on the link's real bandwidth
//! and the machine's speed, so the migration is forced to complete and the source
//! prints whether it converged, for the log.
//!
//! It runs twice: over plaintext `tcp://` (the destination opts in with
//! `Security::insecure`, since it listens on a non-loopback address) and over mutual
//! TLS (`tls://`, certificates made at test time and read by both helpers from a
//! directory in Cloud Hypervisor's layout).
//!
//! Needs root and iproute2; skips visibly otherwise (fails under
//! `MIGRATION_REQUIRE_KVM=1` when it could have run).

use std::thread;
use std::time::Duration;

use migration_core::arch::Arch;
use migration_core::destination::receive_migration_with;
use migration_core::precopy::send_migration_with;
use migration_core::security::Security;
use migration_core::tls::TlsConfig;
use migration_core::{ConvergencePolicy, MigrationOptions, Pausable, ReceiveOptions};
use migration_testkit::netns::{
    print_source_report, skip_unless_netns, HelperTests, NetnsPair, Shape,
};
use migration_testkit::test_pki::TestPki;
use migration_testkit::FakeVm;

/// Selects the role of a helper process: `source` or `destination`.
const ROLE: &str = "MIGRATION_TWO_HOSTS_ROLE";
/// The destination's URL, for the source.
const URL: &str = "MIGRATION_TWO_HOSTS_URL";
/// A certificate directory: set, the helpers migrate over `tls://`.
const TLS_DIR: &str = "MIGRATION_TWO_HOSTS_TLS_DIR";

const MEMORY: u64 = 128 << 20;
const DIRTY_RATE: u64 = 24 << 20;
const DOWNTIME_LIMIT: Duration = Duration::from_millis(200);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn fake_vm_migrates_between_namespaces_over_a_shaped_link() {
    run_two_hosts(false);
}

#[test]
fn fake_vm_migrates_between_namespaces_over_mutual_tls() {
    run_two_hosts(true);
}

fn run_two_hosts(tls: bool) {
    if !skip_unless_netns() {
        return;
    }
    let pair = NetnsPair::create().expect("namespace pair");
    let shape = pair
        .shape(&Shape {
            rate_bits: 1_000_000_000,
            delay: Duration::from_millis(1),
        })
        .expect("shape the link");
    eprintln!("link: {shape}");

    let dir = tempfile::tempdir().expect("certificate directory");
    let mut env = Vec::new();
    if tls {
        let b = NetnsPair::ADDR_B.to_string();
        TestPki::for_server(&[&b])
            .expect("certificates")
            .write_dir(dir.path())
            .expect("write certificates");
        env.push((TLS_DIR, dir.path().as_os_str()));
    }
    let run = pair
        .run_helpers_with_env(
            &HelperTests {
                role_var: ROLE,
                url_var: URL,
                destination: "helper_destination",
                source: "helper_source",
            },
            Duration::from_secs(60),
            &env,
        )
        .expect("helpers ran");
    run.print();
    run.check("RESULT handed-over=true", "RESULT verified=true")
        .unwrap();
}

/// `tls://` and the certificates of [`TLS_DIR`] if it is set, else plaintext `tcp://`
/// (allowed on this non-loopback address by opting in).
fn security() -> (&'static str, Security) {
    match std::env::var_os(TLS_DIR) {
        Some(dir) => (
            "tls",
            Security::tls(TlsConfig::from_dir(dir).expect("certificate directory")),
        ),
        None => ("tcp", Security::insecure()),
    }
}

/// Destination role: listen on namespace B's address, receive, resume, let the
/// workload run on, then pause and self-check.
#[test]
#[ignore = "helper: run by fake_vm_migrates_between_namespaces_over_a_shaped_link"]
fn helper_destination() {
    if std::env::var(ROLE).as_deref() != Ok("destination") {
        return;
    }
    let options = ReceiveOptions::new(Arch::None, migration_serde::registry());
    let (scheme, security) = security();
    let listen = format!("{scheme}://{}:0", NetnsPair::ADDR_B);
    let (mut vm, report) = receive_migration_with(
        &listen,
        &security,
        &options,
        IO_TIMEOUT,
        |url| println!("LISTENING {url}"),
        |incoming| FakeVm::destination(&incoming.layout, migration_serde::registry()),
    )
    .expect("receive the migration");
    println!("received: {report:?}");
    assert!(vm.is_running(), "the destination VM must run after GO");
    let writes_at_arrival = vm.workload().writes;
    thread::sleep(Duration::from_millis(200));
    vm.pause().expect("pause");
    vm.verify().expect("destination self-check");
    let writes = vm.workload().writes;
    println!("workload writes: {writes_at_arrival} at arrival, {writes} after 200 ms here");
    assert!(
        writes > writes_at_arrival,
        "the workload must continue on the destination"
    );
    println!("RESULT verified=true");
}

/// Source role: a VM dirtying memory throughout migrates to the URL in `URL`.
#[test]
#[ignore = "helper: run by fake_vm_migrates_between_namespaces_over_a_shaped_link"]
fn helper_source() {
    if std::env::var(ROLE).as_deref() != Ok("source") {
        return;
    }
    let url = std::env::var(URL).expect("destination URL");
    let mut vm = FakeVm::builder()
        .memory_size(MEMORY)
        .workload(DIRTY_RATE, 8)
        .codecs(migration_serde::registry())
        .build()
        .expect("fake VM");
    // Fill a good part of memory before migrating, then let the workload run.
    vm.run_workload_writes(MEMORY / 4096 / 2)
        .expect("workload writes");
    thread::sleep(Duration::from_millis(100));
    let mut options = MigrationOptions {
        arch: Arch::None,
        downtime_limit: DOWNTIME_LIMIT,
        max_rounds: 30,
        policy: ConvergencePolicy::Force,
        ..MigrationOptions::default()
    };
    let report = send_migration_with(&mut vm, &url, &security().1, &mut options, IO_TIMEOUT)
        .expect("migration");
    print_source_report(&report, DOWNTIME_LIMIT);
    assert!(
        !vm.is_running(),
        "the source must stay paused after handing over"
    );
    vm.verify().expect("source self-check");
    println!("RESULT handed-over=true");
}
