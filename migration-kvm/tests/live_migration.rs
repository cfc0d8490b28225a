//! Live migration of real KVM guests with `KvmVm` (KVM-gated): the memory-pattern and
//! timer guests migrate over tcp and unix while running and go on passing their
//! self-checks from where the source stopped; one guest goes back and forth 20
//! times; and the source survives faults (connect refused, handshake rejected,
//! disconnect mid-round, destination error while applying state, a TLS peer refused
//! or a TLS record altered in transit) and keeps running.
//!
//! Migrations here are forced to complete (`RunningGuest::migrate_to` does so):
//! these tests check what the guest and the source do, and whether precopy converges
//! under the downtime limit depends on the machine's speed (a debug build, a loaded
//! host). `benches/migration.rs` measures convergence.
//! Skipped visibly without /dev/kvm, failing instead under `MIGRATION_REQUIRE_KVM=1`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread;

use anyhow::{anyhow, ensure, Context, Result};
use migration_core::arch::Arch;
use migration_core::destination::IncomingVm;
use migration_core::destination::{receive_migration_over, ReceiveOptions};
use migration_core::precopy::{send_migration, send_migration_over, ConvergencePolicy};
use migration_core::protocol::MigrationError;
use migration_core::{MigratableError, Pausable};
use migration_kvm::{KvmVm, KvmVmConfig, KvmVmError, RestoreMode};
use migration_testkit::guest::{Guest, GuestLog as Log, RunningGuest as Running};
use migration_testkit::relay::{Direction, Relay, RelayAction, RelayFault};
use migration_testkit::require_kvm;
use migration_testkit::test_pki::TestPki;

mod common;

use common::{codecs, migrate_url, BEFORE, IO_TIMEOUT, TIMEOUT};

/// The memory-pattern guest's working set ends here (bounds first-touch cost).
const PATTERN_END: u64 = 24 << 20;
/// Progress events required after a migration.
const AFTER: u64 = 3;

fn boot(guest: Guest) -> Result<Running> {
    common::boot(guest, PATTERN_END)
}

fn build(incoming: &IncomingVm, log: &Log) -> Result<KvmVm, MigratableError> {
    Ok(KvmVm::for_incoming(incoming, codecs(), log.handlers())?)
}

/// Boots `guest`, migrates it over `url` while it runs and checks it continues.
fn migrate_running_guest(guest: Guest, url: &str) -> Result<()> {
    let mut src = boot(guest)?;
    src.advance(BEFORE)?;
    let (dst, report) = migrate_url(&mut src, url)?;
    ensure!(
        report.rounds.len() >= 2,
        "round 0 and a final round: {report:?}"
    );
    // The source copy must never run again.
    let restart = src.vm.start();
    ensure!(
        matches!(restart, Err(KvmVmError::MigratedOut)),
        "restarting the migrated-out source: {restart:?}"
    );
    let m = dst.advance(AFTER)?;
    // Continued from where the source stopped (baseline check in the monitor), and
    // actually advanced past it.
    let first = m.first_progress().unwrap_or(0);
    let base = dst.baseline.unwrap_or(0);
    ensure!(
        first > base,
        "{guest}: first progress {first} after migration, source stopped at {base}"
    );
    eprintln!(
        "{guest} over {url}: {} rounds, {} bytes, downtime {:?}, progress {base} -> {:?}",
        report.rounds.len(),
        report.bytes_sent,
        report.downtime.total,
        m.last_progress()
    );
    Ok(())
}

fn unix_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("unix://{}", dir.path().join(name).display())
}

#[test]
fn memory_pattern_migrates_over_tcp_and_unix_while_running() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    migrate_running_guest(Guest::MemoryPattern, "tcp://127.0.0.1:0")?;
    migrate_running_guest(Guest::MemoryPattern, &unix_url(&dir, "mp.sock"))
}

/// Over two connections (multi-connection): the guest's self-check after the
/// migration checks every page of its pattern, rewritten while precopy ran, holds its
/// newest content.
#[test]
fn memory_pattern_migrates_over_two_connections_while_running() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    let (dst, report) = src
        .migrate_over_connections("tcp://127.0.0.1:0", codecs(), IO_TIMEOUT, 2)
        .context("migration over two connections")?;
    ensure!(
        report.features & migration_core::protocol::FEATURE_MULTI_CONNECTION != 0,
        "two connections were not negotiated: {report:?}"
    );
    ensure!(report.rounds.len() >= 2, "{report:?}");
    let m = dst.advance(AFTER)?;
    let first = m.first_progress().unwrap_or(0);
    let base = dst.baseline.unwrap_or(0);
    ensure!(
        first > base,
        "first progress {first} after migration, source stopped at {base}"
    );
    Ok(())
}

#[test]
fn timer_migrates_over_tcp_and_unix_while_running() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    migrate_running_guest(Guest::Timer, "tcp://127.0.0.1:0")?;
    migrate_running_guest(Guest::Timer, &unix_url(&dir, "timer.sock"))
}

#[test]
fn twenty_back_and_forth_migrations_of_one_guest() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    let mut vm = boot(Guest::MemoryPattern)?;
    vm.advance(BEFORE)?;
    let mut last = vm.last_progress()?;
    for i in 0..20 {
        let url = if i % 2 == 0 {
            unix_url(&dir, &format!("hop{i}.sock"))
        } else {
            "tcp://127.0.0.1:0".to_owned()
        };
        let (next, _) = migrate_url(&mut vm, &url).with_context(|| format!("hop {i}"))?;
        drop(vm);
        vm = next;
        vm.advance(2).with_context(|| format!("after hop {i}"))?;
        let now = vm.last_progress()?;
        ensure!(now > last, "hop {i}: progress {now} did not pass {last}");
        last = now;
    }
    Ok(())
}

/// After a failed migration the source runs, and goes on passing its self-check
/// from where it was.
fn assert_source_survives(src: &Running, context: &str) -> Result<()> {
    ensure!(src.vm.is_running(), "{context}: source not running");
    ensure!(
        src.vm.vcpus().iter().all(|v| !v.is_paused()),
        "{context}: a source vCPU is parked"
    );
    src.advance(AFTER)
        .with_context(|| format!("{context}: source after the failure"))?;
    Ok(())
}

#[test]
fn connect_refused_leaves_the_guest_running() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    let mut opts = src.vm.migration_options();
    let err = send_migration(
        &mut src.vm,
        &unix_url(&dir, "nobody.sock"),
        &mut opts,
        IO_TIMEOUT,
    )
    .expect_err("nobody listens");
    ensure!(matches!(err, MigrationError::Io(_)), "{err}");
    assert_source_survives(&src, "connect refused")
}

#[test]
fn handshake_rejected_leaves_the_guest_running() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    let (a, b) = UnixStream::pair()?;
    let dest = thread::spawn(move || {
        // A destination of another architecture.
        let opts = ReceiveOptions::new(Arch::Aarch64, codecs());
        receive_migration_over(b, &opts, |i| build(i, &Log::default())).map(|_| ())
    });
    let mut opts = src.vm.migration_options();
    let err = send_migration_over(&mut src.vm, a, &mut opts).expect_err("rejected");
    ensure!(
        matches!(&err, MigrationError::Refused(r) if r.contains("architecture")),
        "{err}"
    );
    ensure!(dest.join().map_err(|_| anyhow!("panic"))?.is_err());
    assert_source_survives(&src, "handshake rejected")
}

/// A stream that shuts the socket down (both directions) once `limit` bytes were
/// written: the peer sees EOF in the middle of a frame.
struct CutAfter {
    s: UnixStream,
    written: usize,
    limit: usize,
}

impl Read for CutAfter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.read(buf)
    }
}

impl Write for CutAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.limit {
            let _ = self.s.shutdown(Shutdown::Both);
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "cut by the test"));
        }
        let n = buf.len().min(self.limit - self.written);
        let n = self.s.write(&buf[..n])?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

#[test]
fn disconnect_mid_round_leaves_the_guest_running() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    let log = Log::default();
    let dest = thread::spawn(move || {
        receive_migration_over(b, &KvmVm::receive_options(codecs()), |i| build(i, &log)).map(|_| ())
    });
    let mut opts = src.vm.migration_options();
    // The working set is ~23 MiB of non-zero pages: 4 MiB is inside round 0.
    let cut = CutAfter {
        s: a,
        written: 0,
        limit: 4 << 20,
    };
    let err = send_migration_over(&mut src.vm, cut, &mut opts).expect_err("cut");
    eprintln!("disconnect mid-round: {err}");
    ensure!(dest.join().map_err(|_| anyhow!("panic"))?.is_err());
    assert_source_survives(&src, "disconnect mid-round")
}

#[test]
fn destination_error_while_applying_state_leaves_the_guest_running() -> Result<()> {
    require_kvm!(Ok(()));
    let mut src = boot(Guest::Timer)?;
    src.advance(BEFORE)?;
    let (a, b) = UnixStream::pair()?;
    for s in [&a, &b] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    let dest = thread::spawn(move || {
        // The right layout, but two vCPUs: restoring the one-vCPU state fails.
        receive_migration_over(b, &KvmVm::receive_options(codecs()), |i| {
            let mut config =
                KvmVmConfig::from_bytes(&i.config).map_err(|e| MigratableError::Restore {
                    path: "vm".into(),
                    source: Box::new(e),
                })?;
            config.vcpus = 2;
            Ok(KvmVm::new(config, codecs(), Log::default().handlers())?)
        })
        .map(|_| ())
    });
    let mut opts = src.vm.migration_options();
    // The state must reach the destination whatever the machine's speed.
    opts.policy = ConvergencePolicy::Force;
    let err = send_migration_over(&mut src.vm, a, &mut opts).expect_err("restore fails");
    ensure!(
        matches!(&err, MigrationError::PeerAborted(r) if r.contains("vCPUs")),
        "{err}"
    );
    ensure!(dest.join().map_err(|_| anyhow!("panic"))?.is_err());
    assert_source_survives(&src, "destination restore error")
}

#[test]
fn snapshot_file_restores_eagerly_and_lazily() -> Result<()> {
    require_kvm!(Ok(()));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vm.snap");
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    src.vm.pause()?;
    src.vm.save_snapshot(&path)?;
    let base = src.last_progress()?;
    for mode in [RestoreMode::Eager(Default::default()), RestoreMode::Lazy] {
        let log = Log::default();
        let mut vm = KvmVm::restore_from_file(&path, mode, codecs(), log.handlers())?;
        ensure!(!vm.is_running(), "a restored VM starts paused");
        vm.start()?;
        let r = Running {
            vm,
            log,
            timeout: TIMEOUT,
            baseline: Some(base),
        };
        let m = r.advance(AFTER).with_context(|| format!("{mode:?}"))?;
        ensure!(m.first_progress().unwrap_or(0) > base, "{mode:?}: {m:?}");
    }
    Ok(())
}

/// Over mutual TLS: a destination whose allowlist does not name the source refuses it
/// before any VM is built; a byte flipped in transit mid-round fails its record's MAC.
/// Both times the guest runs on and passes its self-check.
#[test]
fn tls_refusal_and_a_flipped_byte_leave_the_guest_running() -> Result<()> {
    use migration_core::destination::receive_migration_with;
    use migration_core::precopy::send_migration_with;
    use migration_core::security::Security;
    use migration_core::tls::PeerIdentity;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    require_kvm!(Ok(()));
    let pki = TestPki::new()?;
    let mut src = boot(Guest::MemoryPattern)?;
    src.advance(BEFORE)?;
    let client = Security::tls(pki.client_config()?);
    for (case, allow, fault) in [
        ("not on the allowlist", Some("name:someone-else.test"), None),
        (
            "a byte flipped mid-round",
            None,
            Some(RelayFault {
                direction: Direction::ToServer,
                offset: 4 << 20,
                action: RelayAction::Flip(0x01),
            }),
        ),
    ] {
        let mut server = pki.server_config()?;
        if let Some(a) = allow {
            server = server.with_allowlist(vec![PeerIdentity::parse(a)?]);
        }
        let server = Security::tls(server);
        let built = Arc::new(AtomicBool::new(false));
        let b = built.clone();
        let (tx, rx) = mpsc::channel();
        let dest = thread::spawn(move || {
            let log = Log::default();
            receive_migration_with(
                "tls://127.0.0.1:0",
                &server,
                &KvmVm::receive_options(codecs()),
                IO_TIMEOUT,
                |u| {
                    let _ = tx.send(u.to_owned());
                },
                |i| {
                    b.store(true, Ordering::SeqCst);
                    build(i, &log)
                },
            )
            .map(|_| ())
        });
        let url = rx.recv()?;
        let relay = match fault {
            Some(f) => Some(Relay::start(
                url.trim_start_matches("tls://").parse()?,
                Some(f),
            )?),
            None => None,
        };
        let target = relay
            .as_ref()
            .map_or(url.clone(), |r| format!("tls://{}", r.addr()));
        let mut opts = src.vm.migration_options();
        let err = send_migration_with(&mut src.vm, &target, &client, &mut opts, IO_TIMEOUT)
            .expect_err(case);
        let dest_err = dest.join().map_err(|_| anyhow!("panic"))?.expect_err(case);
        eprintln!("{case}: source: {err}; destination: {dest_err}");
        match fault {
            None => {
                ensure!(!built.load(Ordering::SeqCst), "{case}: a VM was built");
                ensure!(dest_err.to_string().contains("allowlist"), "{dest_err}");
                ensure!(err.to_string().contains("AccessDenied"), "{err}");
            }
            Some(_) => {
                ensure!(
                    dest_err.to_string().contains("bad record MAC"),
                    "{dest_err}"
                );
            }
        }
        if let Some(r) = relay {
            ensure!(r.join()?.fault_applied, "{case}: fault not reached");
        }
        assert_source_survives(&src, case)?;
    }
    Ok(())
}
