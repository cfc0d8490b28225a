//! A TCP man in the middle for tests: forwards one connection both ways and, on a
//! plan, flips a byte or cuts the connection at an offset of one direction. Used to
//! show that TLS detects tampering (a flipped ciphertext byte fails the record's MAC)
//! and that both ends survive a cut anywhere; [`cut_postcopy_at`] cuts a postcopy at a
//! share of its pending pages.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};

/// Which way the fault applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting side (a migration source) to the listening side.
    ToServer,
    /// From the listening side back to the connecting side.
    ToClient,
}

/// What happens at the offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayAction {
    /// XOR the byte with this mask (non-zero).
    Flip(u8),
    /// Forward everything before the offset, then close both connections.
    Cut,
}

/// A fault at byte `offset` of `direction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayFault {
    /// Which way.
    pub direction: Direction,
    /// Byte offset in that direction's stream.
    pub offset: u64,
    /// Flip or cut.
    pub action: RelayAction,
}

/// What went through the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes forwarded to the server.
    pub to_server: u64,
    /// Bytes forwarded to the client.
    pub to_client: u64,
    /// Whether the fault's offset was reached.
    pub fault_applied: bool,
}

/// A relay listening on a loopback port, forwarding its first connection to a target.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    handle: JoinHandle<io::Result<RelayStats>>,
}

impl Relay {
    /// Listens on `127.0.0.1:0`; the first connection is forwarded to `target`.
    pub fn start(target: SocketAddr, fault: Option<RelayFault>) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let handle = thread::spawn(move || {
            let (client, _) = listener.accept()?;
            let server = TcpStream::connect(target)?;
            let pump = |from: TcpStream, to: TcpStream, dir: Direction| {
                let fault = fault.filter(|f| f.direction == dir);
                thread::spawn(move || pump(from, to, fault))
            };
            let up = pump(
                client.try_clone()?,
                server.try_clone()?,
                Direction::ToServer,
            );
            let down = pump(server, client, Direction::ToClient);
            let (to_server, a) = up.join().unwrap_or((0, false));
            let (to_client, b) = down.join().unwrap_or((0, false));
            Ok(RelayStats {
                to_server,
                to_client,
                fault_applied: a || b,
            })
        });
        Ok(Self { addr, handle })
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for both directions to end.
    pub fn join(self) -> io::Result<RelayStats> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("relay thread panicked"))?
    }
}

/// Copies `from` to `to` until either ends; returns the bytes forwarded and whether
/// the fault was applied.
fn pump(mut from: TcpStream, mut to: TcpStream, fault: Option<RelayFault>) -> (u64, bool) {
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = 0u64;
    let mut applied = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if let Some(f) = fault.filter(|f| !applied && f.offset >= pos && f.offset < pos + n as u64)
        {
            applied = true;
            let at = (f.offset - pos) as usize;
            match f.action {
                RelayAction::Flip(mask) => chunk[at] ^= mask,
                RelayAction::Cut => {
                    let _ = to.write_all(&chunk[..at]);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return (pos + at as u64, true);
                }
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        pos += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
    (pos, applied)
}

/// Accepts one connection on `listener`, connects to `dest_addr`, forwards both ways,
/// and cuts both connections once `fraction` of a postcopy's pending bytes passed
/// source → destination after GO: a cut at 10 %, 50 %, 90 % of the postcopy phase,
/// whatever the timing. Frames are parsed
/// from the protocol's header: type u16, flags u16, length u32, payload, CRC u64.
pub fn cut_postcopy_at(listener: TcpListener, dest_addr: String, fraction: f64) -> JoinHandle<()> {
    thread::spawn(move || {
        let (src, _) = listener.accept().expect("accept");
        let dst = TcpStream::connect(&dest_addr).expect("connect");
        let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        // Destination → source: plain copy until either side goes.
        let back = thread::spawn(move || {
            let (mut from, mut to) = (dst2, src2);
            let _ = io::copy(&mut from, &mut to);
        });
        let (mut from, mut to) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let mut pending = 0u64;
        let mut sent = 0u64;
        let mut go = false;
        let mut parse: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            parse.extend_from_slice(&buf[..n]);
            while parse.len() >= 8 {
                let ty = u16::from_le_bytes([parse[0], parse[1]]);
                let len = u32::from_le_bytes([parse[4], parse[5], parse[6], parse[7]]) as usize;
                if parse.len() < 16 + len {
                    break;
                }
                let p = &parse[8..8 + len];
                let ranges = |at: usize| -> u64 {
                    let count = u32::from_le_bytes(p[at..at + 4].try_into().unwrap()) as usize;
                    (0..count)
                        .map(|k| {
                            let o = at + 4 + 16 * k + 8;
                            u64::from_le_bytes(p[o..o + 8].try_into().unwrap())
                        })
                        .sum()
                };
                match ty {
                    11 => pending += ranges(9),
                    8 => go = true,
                    3 if go => sent += len as u64 - 8,
                    4 if go => sent += ranges(0),
                    _ => {}
                }
                parse.drain(..16 + len);
            }
            if go && pending > 0 && sent as f64 >= fraction * pending as f64 {
                break;
            }
        }
        for s in [&src, &dst] {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = back.join();
    })
}
