//! Two network namespaces joined by a veth pair, for tests that migrate between
//! "hosts": the source in one namespace, the destination in the other, the link
//! shaped by `tc`.
//!
//! [`NetnsPair::create`] makes two namespaces with unique names, a veth pair with
//! one end in each ([`NetnsPair::addr_a`] = `10.200.0.1` in namespace A,
//! [`NetnsPair::addr_b`] = `10.200.0.2` in namespace B) and brings the links up.
//! [`NetnsPair::shape`] limits the rate (and adds delay where the kernel has
//! `sch_netem`) on both ends. [`NetnsPair::command`] builds a [`Command`] that runs
//! in one namespace (`ip netns exec <ns> …`). Dropping the pair deletes both
//! namespaces, which destroys the veth pair, so a failing test cleans up too; a pair
//! left behind by a killed process is removed by the next [`NetnsPair::create`].
//!
//! Needs root and iproute2 (`ip`, `tc`). Tests call [`skip_unless_netns`] first: it
//! prints `skipped: network namespaces not usable: <reason>` and returns `false`,
//! or panics when `MIGRATION_REQUIRE_KVM=1` is set and we are root with `ip`
//! installed (a CI machine where the test must run).
//!
//! ```no_run
//! use std::time::Duration;
//! use migration_testkit::netns::{skip_unless_netns, NetnsPair, Shape, Side};
//!
//! if skip_unless_netns() {
//!     let pair = NetnsPair::create()?;
//!     let applied = pair.shape(&Shape { rate_bits: 1_000_000_000, delay: Duration::from_millis(1) })?;
//!     println!("link: {applied}");
//!     let out = pair.command(Side::B, "ip").args(["addr"]).output()?;
//!     assert!(out.status.success());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use migration_core::precopy::MigrationReport;

use crate::kvm::kvm_required;

/// Prefix of every namespace this module creates: `migtk-<pid>-<n>-{a,b}`.
const PREFIX: &str = "migtk-";

/// Counter that makes names unique within a process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A failure to set up or shape the namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A tool could not be started (not installed?).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A helper test did not do what [`NetnsPair::run_helpers`] needs.
    #[error("helper test `{test}`: {what}")]
    Helper {
        /// The helper test's name.
        test: String,
        /// What went wrong.
        what: String,
    },
}

/// The two helper tests of a two-host migration test ([`NetnsPair::run_helpers`]).
#[derive(Clone, Copy, Debug)]
pub struct HelperTests<'a> {
    /// Environment variable that tells a helper its role: `source` or `destination`
    /// (a helper run any other way should do nothing).
    pub role_var: &'a str,
    /// Environment variable that gives the source the destination's URL.
    pub url_var: &'a str,
    /// The destination's test, run in namespace B.
    pub destination: &'a str,
    /// The source's test, run in namespace A.
    pub source: &'a str,
}

/// How the two helpers of [`NetnsPair::run_helpers`] ended and what they printed.
#[derive(Debug)]
pub struct HelperRun {
    /// The source's exit status.
    pub source_status: ExitStatus,
    /// The source's stdout.
    pub source_out: String,
    /// The destination's exit status.
    pub destination_status: ExitStatus,
    /// The destination's stdout, by line.
    pub destination_lines: Vec<String>,
}

impl HelperRun {
    /// Prints both outputs (stdout: shown with `--nocapture` or when the test fails).
    pub fn print(&self) {
        println!("--- source (namespace A) ---\n{}", self.source_out);
        println!(
            "--- destination (namespace B) ---\n{}",
            self.destination_lines.join("\n")
        );
    }

    /// Checks that both helpers exited successfully and that each printed a line
    /// ending with its expected result (`source_result`, `destination_result`, e.g.
    /// `RESULT handed-over=true`); if not, says which one failed and how.
    pub fn check(&self, source_result: &str, destination_result: &str) -> Result<(), String> {
        if !self.source_status.success() {
            return Err(format!("source failed: {}", self.source_status));
        }
        if !self.destination_status.success() {
            return Err(format!("destination failed: {}", self.destination_status));
        }
        if !self.source_out.lines().any(|l| l.ends_with(source_result)) {
            return Err(format!("the source did not print `{source_result}`"));
        }
        if !self
            .destination_lines
            .iter()
            .any(|l| l.ends_with(destination_result))
        {
            return Err(format!(
                "the destination did not print `{destination_result}`"
            ));
        }
        Ok(())
    }

    /// The number after `key` on the first source line that has one.
    pub fn source_value(&self, key: &str) -> Option<u64> {
        value_after(self.source_out.lines(), key)
    }

    /// The number after `key` on the first destination line that has one.
    pub fn destination_value(&self, key: &str) -> Option<u64> {
        value_after(self.destination_lines.iter().map(String::as_str), key)
    }
}

/// Prints a source helper's migration for the log: the report, the bandwidth it
/// measured over the link, and whether precopy converged under `downtime_limit` (a
/// fact about the link and the machine, which a test prints but does not require).
pub fn print_source_report(report: &MigrationReport, downtime_limit: Duration) {
    println!("{report}");
    println!(
        "bandwidth {:.1} MB/s, total {:?}, downtime {:?} (limit {downtime_limit:?}), converged under the limit: {}",
        report.bandwidth / 1e6,
        report.total_time,
        report.downtime.total,
        report.converged,
    );
}

fn value_after<'a>(mut lines: impl Iterator<Item = &'a str>, key: &str) -> Option<u64> {
    lines.find_map(|l| l.split_once(key).and_then(|(_, v)| v.trim().parse().ok()))
}

/// Kills a helper process left running when [`NetnsPair::run_helpers`] returns early.
struct Reap(Option<Child>);

impl Reap {
    fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.0.take() {
            Some(mut child) => child.wait(),
            None => Err(std::io::Error::other("helper already reaped")),
        }
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One side of a [`NetnsPair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Namespace A, address [`NetnsPair::addr_a`].
    A,
    /// Namespace B, address [`NetnsPair::addr_b`].
    B,
}

/// The link a test asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Rate in bits per second, each direction.
    pub rate_bits: u64,
    /// One-way delay added on each end (so the round trip gains twice this).
    pub delay: Duration,
}

/// The link [`NetnsPair::shape`] set up: the rate always, the delay only where the
/// kernel has `sch_netem`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedShape {
    /// Rate in bits per second, each direction.
    pub rate_bits: u64,
    /// One-way delay per end, or why none could be added.
    pub delay: Result<Duration, String>,
    /// The qdisc used (`netem` or `tbf`).
    pub qdisc: &'static str,
}

impl fmt::Display for AppliedShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} Mbit/s via {}",
            self.rate_bits / 1_000_000,
            self.qdisc
        )?;
        match &self.delay {
            Ok(d) => write!(f, ", {} µs delay per end", d.as_micros()),
            Err(why) => write!(f, ", no delay ({why})"),
        }
    }
}

/// Two namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    ns_a: String,
    ns_b: String,
    dev_a: String,
    dev_b: String,
}

impl NetnsPair {
    /// Address of namespace A's end of the veth pair.
    pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    /// Address of namespace B's end of the veth pair.
    pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);

    /// Creates two fresh namespaces with a veth pair between them, addresses set and
    /// links (and loopback) up. Deletes namespaces left behind by dead processes
    /// first. On error, whatever was created is removed.
    pub fn create() -> Result<Self, NetnsError> {
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Interface names are limited to 15 bytes: keep them short.
        let tag = format!("{:x}{n:x}", pid);
        let pair = NetnsPair {
            ns_a: format!("{PREFIX}{pid}-{n}-a"),
            ns_b: format!("{PREFIX}{pid}-{n}-b"),
            dev_a: format!("mva{tag}"),
            dev_b: format!("mvb{tag}"),
        };
        // From here on, Drop removes whatever exists.
        ip(&["netns", "add", &pair.ns_a])?;
        ip(&["netns", "add", &pair.ns_b])?;
        ip(&[
            "link",
            "add",
            &pair.dev_a,
            "type",
            "veth",
            "peer",
            "name",
            &pair.dev_b,
        ])?;
        ip(&["link", "set", &pair.dev_a, "netns", &pair.ns_a])?;
        ip(&["link", "set", &pair.dev_b, "netns", &pair.ns_b])?;
        for (ns, dev, addr) in [
            (&pair.ns_a, &pair.dev_a, Self::ADDR_A),
            (&pair.ns_b, &pair.dev_b, Self::ADDR_B),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Namespace name of `side`.
    pub fn namespace(&self, side: Side) -> &str {
        match side {
            Side::A => &self.ns_a,
            Side::B => &self.ns_b,
        }
    }

    /// Interface name of `side`'s end of the veth pair.
    pub fn device(&self, side: Side) -> &str {
        match side {
            Side::A => &self.dev_a,
            Side::B => &self.dev_b,
        }
    }

    /// Address of namespace A's end.
    pub fn addr_a(&self) -> Ipv4Addr {
        Self::ADDR_A
    }

    /// Address of namespace B's end.
    pub fn addr_b(&self) -> Ipv4Addr {
        Self::ADDR_B
    }

    /// Shapes both ends of the link: `netem delay <d> rate <r>` where the kernel has
    /// netem, otherwise a token bucket (`tbf`) at the rate and no delay (the returned
    /// [`AppliedShape`] says so; print it).
    pub fn shape(&self, shape: &Shape) -> Result<AppliedShape, NetnsError> {
        let rate = format!("{}bit", shape.rate_bits);
        let delay = format!("{}us", shape.delay.as_micros());
        let mut netem_error = None;
        for side in [Side::A, Side::B] {
            let (ns, dev) = (self.namespace(side), self.device(side));
            let netem = ip(&[
                "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                "delay", &delay, "rate", &rate, "limit", "100000",
            ]);
            if let Err(e) = netem {
                netem_error = Some(e.to_string());
                break;
            }
        }
        let Some(why) = netem_error else {
            return Ok(AppliedShape {
                rate_bits: shape.rate_bits,
                delay: Ok(shape.delay),
                qdisc: "netem",
            });
        };
        // A burst of at least one 1 ms worth of bytes (and of a 64 KiB GSO segment).
        let burst = (shape.rate_bits / 8 / 1000).max(128 << 10);
        for side in [Side::A, Side::B] {
            let (ns, dev) = (self.namespace(side), self.device(side));
            ip(&[
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                &burst.to_string(),
                "latency",
                "50ms",
            ])?;
        }
        Ok(AppliedShape {
            rate_bits: shape.rate_bits,
            delay: Err(format!("sch_netem unavailable: {why}")),
            qdisc: "tbf",
        })
    }

    /// A command that runs `program` inside `side`'s namespace
    /// (`ip netns exec <ns> <program>`); add arguments, environment and stdio to it.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.namespace(side)])
            .arg(program);
        cmd
    }

    /// A command that re-runs the current test binary inside `side`'s namespace with
    /// only the (normally `#[ignore]`d) test `test_name`:
    /// `ip netns exec <ns> <current exe> --exact <test_name> --ignored --nocapture`.
    /// The helper test should do nothing unless an environment variable the caller
    /// sets on the command says which role to play.
    pub fn exec_test(&self, side: Side, test_name: &str) -> Result<Command, NetnsError> {
        let exe = std::env::current_exe().map_err(|source| NetnsError::Spawn {
            command: "current_exe".into(),
            source,
        })?;
        let mut cmd = self.command(side, exe);
        cmd.args([
            "--exact",
            test_name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ]);
        Ok(cmd)
    }

    /// Runs a two-host migration made of two helper tests of the current test binary
    /// ([`exec_test`](Self::exec_test)): `tests.destination` in namespace B, which
    /// must print `LISTENING <url>` on a line of its stdout, then, once it has,
    /// `tests.source` in namespace A with `tests.url_var` set to that URL. Each gets
    /// `tests.role_var` set to `destination` or `source`. Waits for both to end and
    /// returns what they printed; a helper still running when this returns early is
    /// killed.
    pub fn run_helpers(
        &self,
        tests: &HelperTests<'_>,
        listen_timeout: Duration,
    ) -> Result<HelperRun, NetnsError> {
        self.run_helpers_with_env(tests, listen_timeout, &[])
    }

    /// [`run_helpers`](Self::run_helpers) with `env` set in both helpers (a TLS
    /// certificate directory, for example).
    pub fn run_helpers_with_env(
        &self,
        tests: &HelperTests<'_>,
        listen_timeout: Duration,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<HelperRun, NetnsError> {
        let spawn_error = |what: &str| {
            let command = format!("helper test {what}");
            move |source| NetnsError::Spawn { command, source }
        };
        let mut dest = self
            .exec_test(Side::B, tests.destination)?
            .envs(env.iter().copied())
            .env(tests.role_var, "destination")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_error(tests.destination))?;
        let dest_out = dest.stdout.take();
        let mut dest = Reap(Some(dest));
        let (url_tx, url_rx) = mpsc::channel();
        let dest_reader = thread::spawn(move || {
            let mut lines = Vec::new();
            let mut url_tx = Some(url_tx);
            for line in dest_out.into_iter().flat_map(|o| BufReader::new(o).lines()) {
                let Ok(line) = line else { break };
                // libtest prints `test <name> ... ` without a newline before it.
                if let Some((_, url)) = line.split_once("LISTENING ") {
                    if let Some(tx) = url_tx.take() {
                        let _ = tx.send(url.to_owned());
                    }
                }
                lines.push(line);
            }
            lines
        });
        let url = url_rx
            .recv_timeout(listen_timeout)
            .map_err(|_| NetnsError::Helper {
                test: tests.destination.to_owned(),
                what: format!("printed no `LISTENING <url>` line within {listen_timeout:?}"),
            })?;
        let mut source = Reap(Some(
            self.exec_test(Side::A, tests.source)?
                .envs(env.iter().copied())
                .env(tests.role_var, "source")
                .env(tests.url_var, &url)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(spawn_error(tests.source))?,
        ));
        let mut source_out = String::new();
        if let Some(out) = source.0.as_mut().and_then(|c| c.stdout.as_mut()) {
            out.read_to_string(&mut source_out)
                .map_err(spawn_error(tests.source))?;
        }
        let source_status = source.wait().map_err(spawn_error(tests.source))?;
        let destination_status = dest.wait().map_err(spawn_error(tests.destination))?;
        let destination_lines = dest_reader.join().unwrap_or_default();
        Ok(HelperRun {
            source_status,
            source_out,
            destination_status,
            destination_lines,
        })
    }

    /// Deletes both namespaces now (also done on drop).
    pub fn cleanup(&mut self) -> Result<(), NetnsError> {
        let a = delete_namespace(&self.ns_a);
        let b = delete_namespace(&self.ns_b);
        a.and(b)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("netns cleanup: {e}");
        }
    }
}

/// Deletes namespace `ns` if it exists (its veth end goes with it, and the peer too).
fn delete_namespace(ns: &str) -> Result<(), NetnsError> {
    if !Path::new("/run/netns").join(ns).exists() {
        return Ok(());
    }
    ip(&["netns", "del", ns])
}

/// Deletes `migtk-<pid>-…` namespaces whose process is gone (killed tests).
fn remove_stale() {
    let Ok(out) = run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run(Command::new("ip").args(args)).map(drop)
}

fn run(cmd: &mut Command) -> Result<Output, NetnsError> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: line.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(NetnsError::Failed {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn tool_present(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Whether this process can create network namespaces and shape links: root, `ip`
/// and `tc` installed, and `ip netns add` works. The error says why not.
pub fn netns_available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    for tool in ["ip", "tc"] {
        if !tool_present(tool) {
            return Err(format!("`{tool}` (iproute2) not installed"));
        }
    }
    NetnsPair::create()
        .map(drop)
        .map_err(|e| format!("cannot create a namespace pair: {e}"))
}

/// `true` when namespaces are usable. Otherwise prints
/// `skipped: network namespaces not usable: <reason>` to stderr and returns `false`,
/// or panics when `MIGRATION_REQUIRE_KVM=1` is set and we are root with `ip`
/// installed (the test could and should have run).
pub fn skip_unless_netns() -> bool {
    match netns_available() {
        Ok(()) => true,
        Err(reason) => {
            let could = rustix::process::geteuid().is_root() && tool_present("ip");
            if could && kvm_required() {
                panic!("network namespaces not usable: {reason} (root, `ip` present and MIGRATION_REQUIRE_KVM=1)");
            }
            eprintln!("skipped: network namespaces not usable: {reason}");
            false
        }
    }
}
