//! Helpers shared by the workspace's benchmark binaries: their settings from the
//! environment, the machine limits they compare against (raw loopback TCP), and how
//! they print a migration.
//!
//! ```
//! use migration_testkit::bench::{env_or, loopback_tcp_copy};
//!
//! let bytes = env_or("MY_BENCH_BYTES", 4 << 20);
//! let took = loopback_tcp_copy(bytes, None)?;
//! println!("{:.2} GB/s", bytes as f64 / took.as_secs_f64() / 1e9);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use migration_core::{MemorySink, MigrationReport};

use crate::rng::Rng;

/// Size of each read and write of [`loopback_tcp_copy`].
const BUF: usize = 2 << 20;

/// The environment variable `name` as a number, or `default` if it is unset or not
/// a number.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A plain copy of `bytes` random bytes through 127.0.0.1 with 2 MiB reads and
/// writes: the machine's limit for anything sent over loopback TCP. Returns the time
/// from connect until the receiver has everything. With `sink`, the receiver also
/// writes each 2 MiB it reads into it from guest address 0 on (into fresh memory:
/// first touch, the least a migration destination must do).
pub fn loopback_tcp_copy(
    bytes: usize,
    sink: Option<&(dyn MemorySink + Sync)>,
) -> io::Result<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut data = vec![0u8; BUF];
    Rng::new(1).fill(&mut data);
    thread::scope(|scope| {
        let receiver = scope.spawn(move || -> io::Result<Instant> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; BUF];
            let mut done = 0;
            while done < bytes {
                let n = (bytes - done).min(BUF);
                s.read_exact(&mut buf[..n])?;
                if let Some(sink) = sink {
                    sink.write_memory(done as u64, &buf[..n])
                        .map_err(io::Error::other)?;
                }
                done += n;
            }
            Ok(Instant::now())
        });
        let start = Instant::now();
        let mut s = TcpStream::connect(addr)?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BUF);
            s.write_all(&data[..n])?;
            left -= n;
        }
        let end = receiver
            .join()
            .map_err(|_| io::Error::other("the receiver thread panicked"))??;
        Ok(end - start)
    })
}

/// Prints `report` ([`MigrationReport`]'s `Display`: a line per round, then the
/// downtime), each line indented by four spaces.
pub fn print_report(report: &MigrationReport) {
    for line in report.to_string().lines() {
        println!("    {line}");
    }
}
