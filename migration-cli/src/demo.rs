//! `vmsnap demo`: boot a self-checking guest, snapshot it to a file, restore it into a
//! fresh VM, live-migrate it over a loopback socket (`--rounds N` times, ping-pong;
//! `--tls`: over mutual TLS on `tls://127.0.0.1`),
//! and report sizes, times, rounds, bytes, downtime and the guest's own verdict after
//! each step.
//!
//! The flow is written once over [`DemoTarget`] (in [`demo_target`](crate::demo_target));
//! [`demo_kvm`](crate::demo_kvm) runs it on a KVM guest, [`demo_fake`](crate::demo_fake)
//! on migration-testkit's `FakeVm` (where `/dev/kvm` is unusable, or with
//! `VMSNAP_FORCE_FAKE=1`).

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use migration_core::endpoint::{Endpoint, Stream};
use migration_core::security::Security;
use migration_core::tls::{PeerIdentity, TlsConfig};
use migration_core::{receive_migration_over, send_migration_over, AutoConverge};
use migration_testkit::shaped::Shaped;
use migration_testkit::test_pki::TestPki;

use crate::demo_fake::FakeTarget;
use crate::demo_kvm::KvmTarget;
use crate::demo_target::{Check, DemoArgs, DemoTarget};
use crate::progress;
use crate::report::{bytes, duration, migration_lines};
use crate::report_svg;
use crate::EXIT_FAILED;

/// Environment variable that forces the fake-VM demo even where KVM works.
pub const FORCE_FAKE_ENV: &str = "VMSNAP_FORCE_FAKE";

/// Runs `vmsnap demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let forced = std::env::var(FORCE_FAKE_ENV).is_ok_and(|v| v == "1");
    let kvm = if forced {
        Err(format!("{FORCE_FAKE_ENV}=1"))
    } else {
        migration_testkit::kvm_available()
    };
    match kvm {
        Ok(()) => {
            let mut target = KvmTarget::new(args)?;
            flow(&mut target, args)
        }
        Err(reason) => {
            println!("no usable /dev/kvm ({reason}): running the demo on a fake VM");
            let mut target = FakeTarget::new(args)?;
            flow(&mut target, args)
        }
    }
}

fn verdict_line(step: &str, c: &Check) -> String {
    format!(
        "  guest after {step}: {} ({})",
        if c.ok {
            "continued correctly"
        } else {
            "FAILED"
        },
        c.detail
    )
}

/// The demo flow over any target.
pub fn flow<T: DemoTarget>(target: &mut T, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    println!("vmsnap demo: {}", target.describe());
    // The first failure ends the demo: later steps would only wait on a dead guest.
    let failed = |step: &str, c: &Check| -> Option<ExitCode> {
        println!("{}", verdict_line(step, c));
        if c.ok {
            return None;
        }
        println!(
            "demo FAILED: the guest reported a failure after {step} ({} total)",
            duration(started.elapsed())
        );
        Some(ExitCode::from(EXIT_FAILED))
    };

    let mut vm = target.boot().context("booting the guest")?;
    let mut mark = 0u64;
    let c = target.check(&mut vm, &mut mark)?;
    if let Some(code) = failed("boot", &c) {
        return Ok(code);
    }

    let temp;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };

    if !args.migrate_only {
        let path = dir.join("demo.snap");
        let t = Instant::now();
        let spinner = progress::Spinner::start("writing the snapshot");
        let mut snap_mark = target
            .snapshot(&mut vm, &path)
            .context("snapshot to file")?;
        let snap_time = t.elapsed();
        drop(spinner);
        let meta = std::fs::metadata(&path)?;
        println!(
            "snapshot: {} in {} — file {} ({} on disk) for {} of guest memory",
            path.display(),
            duration(snap_time),
            bytes(meta.len()),
            bytes(meta.blocks() * 512),
            bytes(target.guest_memory())
        );
        let c = target.check(&mut vm, &mut mark)?;
        if let Some(code) = failed("snapshot (source)", &c) {
            return Ok(code);
        }

        let t = Instant::now();
        let spinner = progress::Spinner::start("restoring into a fresh VM");
        let mut restored = target.restore(&path).context("restore from file")?;
        let restore_time = t.elapsed();
        drop(spinner);
        println!("restore: into a fresh VM in {}", duration(restore_time));
        let c = target.check(&mut restored, &mut snap_mark)?;
        if let Some(code) = failed("restore", &c) {
            return Ok(code);
        }
        drop(restored);
        if args.keep.is_some() {
            println!("  kept {}", path.display());
        }
    }

    if !args.snapshot_only {
        let tls = if args.uses_tls() {
            Some(tls_pair(args)?)
        } else {
            None
        };
        for i in 1..=args.rounds {
            let (next, lines, how) = migrate(target, vm, i, tls.as_ref(), args)?;
            vm = next;
            let link = match args.link {
                Some(rate) => format!(", limited to {}/s", bytes(rate)),
                None => String::new(),
            };
            println!("migration {i}/{}: {how}{link}", args.rounds);
            for l in lines {
                println!("  {l}");
            }
            let c = target.check(&mut vm, &mut mark)?;
            if let Some(code) = failed(&format!("migration {i}"), &c) {
                return Ok(code);
            }
        }
    }
    drop(vm);
    println!(
        "demo OK: the guest continued correctly after every step ({} total)",
        duration(started.elapsed())
    );
    Ok(ExitCode::SUCCESS)
}

/// The destination's and the source's TLS settings: from `--tls-dir`, or a throwaway
/// CA and certificates for 127.0.0.1; with `--allow-peer`'s allowlist on both.
struct TlsPair {
    server: Security,
    client: Security,
    origin: String,
}

fn tls_pair(args: &DemoArgs) -> anyhow::Result<TlsPair> {
    let allow = args
        .allow_peer
        .iter()
        .map(|p| PeerIdentity::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (server, client, origin) = match &args.tls_dir {
        Some(dir) => {
            let c = TlsConfig::from_dir(dir)
                .with_context(|| format!("TLS certificates in {}", dir.display()))?;
            let c = std::sync::Arc::new(c.with_allowlist(allow));
            (c.clone(), c, format!("certificates from {}", dir.display()))
        }
        None => {
            let pki = TestPki::new().context("making throwaway certificates")?;
            (
                std::sync::Arc::new(pki.server_config()?.with_allowlist(allow.clone())),
                std::sync::Arc::new(pki.client_config()?.with_allowlist(allow)),
                "a throwaway CA and certificates made at run time".to_owned(),
            )
        }
    };
    Ok(TlsPair {
        server: Security::tls(server),
        client: Security::tls(client),
        origin,
    })
}

/// A connected pair: a unix socket pair, or a TLS connection over loopback TCP (the
/// destination's end, the source's end, and a line saying how).
fn connect(tls: Option<&TlsPair>) -> anyhow::Result<(Stream, Stream, String)> {
    let timeout = Some(Duration::from_secs(30));
    let Some(tls) = tls else {
        let (a, b) = UnixStream::pair()?;
        for s in [&a, &b] {
            s.set_read_timeout(timeout)?;
        }
        return Ok((
            Stream::Unix(b),
            Stream::Unix(a),
            "over a loopback unix socket".into(),
        ));
    };
    let listener = Endpoint::parse("tls://127.0.0.1:0")?.bind_with(&tls.server)?;
    let url = listener.url()?;
    let server = tls.server.clone();
    let accept = thread::spawn(move || listener.accept_with(&server, timeout, |_, _| {}));
    let source = Endpoint::parse(&url)?.connect_with(&tls.client, timeout);
    let dest = accept
        .join()
        .map_err(|_| anyhow!("the TLS accept thread panicked"))?;
    let (dest, source) = match (dest, source) {
        (Ok(d), Ok(s)) => (d, s),
        (d, s) => {
            let side = |r: Result<Stream, migration_core::security::SecurityError>| {
                r.err().map_or("ok".to_owned(), |e| e.to_string())
            };
            anyhow::bail!(
                "TLS refused: source side: {}; destination side: {}",
                side(s),
                side(d)
            )
        }
    };
    let how = match source.tls() {
        Some(s) => format!(
            "over {url}, mutual TLS 1.3 ({}), {}, handshake {}, destination presents {}",
            s.cipher_suite(),
            tls.origin,
            duration(s.handshake_time()),
            s.peer_identities()
                .first()
                .map_or_else(|| "no identity".to_owned(), ToString::to_string)
        ),
        None => format!("over {url}"),
    };
    Ok((dest, source, how))
}

/// Migrates `vm` to a fresh destination in another thread; returns the destination
/// (running), the report lines and how it travelled.
fn migrate<T: DemoTarget>(
    target: &mut T,
    mut vm: T::Vm,
    round: u32,
    tls: Option<&TlsPair>,
    args: &DemoArgs,
) -> anyhow::Result<(T::Vm, Vec<String>, String)> {
    let (b, a, how) = connect(tls)?;
    let build = target.destination();
    let recv_options = target.receive_options();
    let dest = thread::Builder::new()
        .name(format!("vmsnap-dest-{round}"))
        .spawn(move || receive_migration_over(b, &recv_options, build))?;
    let mut options = target.migration_options(&vm);
    let (callback, bar) = progress::migration(&format!("migration {round}"));
    options.progress = Some(callback);
    if args.auto_converge {
        options.auto_converge = Some(AutoConverge::default());
    }
    let sent = match args.link {
        Some(rate) => send_migration_over(&mut vm, Shaped::new(a, rate), &mut options),
        None => send_migration_over(&mut vm, a, &mut options),
    };
    bar.finish_and_clear();
    let received = dest
        .join()
        .map_err(|_| anyhow!("the destination thread panicked"))?;
    let report = sent.context("migration (source side)")?;
    let (dest_vm, recv) = received.context("migration (destination side)")?;
    let mut lines = migration_lines(&report);
    if let Some(path) = &args.report {
        let svg = report_svg::render(&report)?;
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        lines.push(format!("report picture: {}", path.display()));
    }
    lines.push(format!(
        "destination received {} rounds, {} of memory data, {} as zero ranges, {} of state",
        recv.rounds,
        bytes(recv.memory_bytes),
        bytes(recv.zero_bytes),
        bytes(recv.state_bytes)
    ));
    // The source stays paused after the handover; dropping it frees it.
    drop(vm);
    Ok((dest_vm, lines, how))
}
