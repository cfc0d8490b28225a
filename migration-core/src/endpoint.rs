//! Socket endpoints named by URL: `tcp://host:port`, `tls://host:port` and `unix:///path`.
//!
//! The live-migration entry points ([`send_migration`](crate::precopy::send_migration),
//! [`receive_migration`](crate::destination::receive_migration)) connect and listen
//! through these; any other scheme is [`MigratableError::UnsupportedScheme`].
//! `tls://` is TCP with mutual TLS: it needs a [`Security`] with TLS credentials
//! ([`Endpoint::connect_with`], [`Endpoint::bind_with`], [`Listener::accept_with`]);
//! the plain [`Endpoint::connect`] and [`Listener::accept`] refuse it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::MigratableError;
use crate::security::{Security, SecurityError};
#[cfg(feature = "tls")]
use crate::tls::{self, TlsStream};

/// A parsed socket endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`
    Tcp(String),
    /// `tls://host:port`: TCP with mutual TLS.
    Tls {
        /// `host:port` to connect to or listen on.
        addr: String,
        /// The host, which the server's certificate must be valid for (unless the
        /// TLS configuration names another).
        host: String,
    },
    /// `unix:///path`
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://host:port`, `tls://host:port` or `unix:///absolute/path` (the
    /// snapshot transports use it too, beside their own `file://`).
    pub fn parse(url: &str) -> Result<Self, MigratableError> {
        let invalid = |reason: &str| MigratableError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        match parsed.scheme() {
            scheme @ ("tcp" | "tls") => {
                let host = parsed
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| invalid(&format!("no host: use {scheme}://host:port")))?;
                let port = parsed
                    .port()
                    .ok_or_else(|| invalid(&format!("no port: use {scheme}://host:port")))?;
                if parsed.path().len() > 1 {
                    return Err(invalid(&format!(
                        "a {scheme} URL has no path: use {scheme}://host:port"
                    )));
                }
                let addr = format!("{host}:{port}");
                Ok(if scheme == "tls" {
                    Endpoint::Tls {
                        addr,
                        host: host.to_owned(),
                    }
                } else {
                    Endpoint::Tcp(addr)
                })
            }
            "unix" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid("a unix URL has no host: use unix:///path"));
                }
                let path = parsed.path();
                if path.is_empty() || path == "/" {
                    return Err(invalid("no socket path"));
                }
                Ok(Endpoint::Unix(PathBuf::from(path)))
            }
            other => Err(MigratableError::UnsupportedScheme {
                url: url.to_owned(),
                scheme: other.to_owned(),
            }),
        }
    }

    /// The URL of this endpoint.
    pub fn url(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => format!("tcp://{addr}"),
            Endpoint::Tls { addr, .. } => format!("tls://{addr}"),
            Endpoint::Unix(path) => format!("unix://{}", path.display()),
        }
    }

    /// Connects to a `tcp://` or `unix://` endpoint; a `tls://` one needs
    /// [`Endpoint::connect_with`].
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Tls { .. } => {
                Err(SecurityError::TlsNotConfigured { url: self.url() }.into_io())
            }
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        }
    }

    /// Connects under `security`: for `tls://`, the TCP connection, the TLS handshake
    /// (the server verified by the URL's host) and the server's authorization, within
    /// the handshake deadline; the read timeout is `io_timeout` afterwards. TLS
    /// credentials with a `tcp://` URL are refused (say `tls://`).
    pub fn connect_with(
        &self,
        security: &Security,
        io_timeout: Option<Duration>,
    ) -> Result<Stream, SecurityError> {
        match self {
            Endpoint::Tcp(addr) if security.has_tls() => {
                Err(SecurityError::TlsNotRequested { addr: addr.clone() })
            }
            Endpoint::Tls { addr, host } => {
                #[cfg(feature = "tls")]
                {
                    let config = security
                        .tls_config()
                        .ok_or_else(|| SecurityError::TlsNotConfigured { url: self.url() })?;
                    let tcp = TcpStream::connect(addr)?;
                    tcp.set_nodelay(true)?;
                    let tls = config.connect(tcp, host, io_timeout)?;
                    Ok(Stream::Tls(Box::new(tls)))
                }
                #[cfg(not(feature = "tls"))]
                {
                    let _ = (addr, host, io_timeout);
                    Err(SecurityError::TlsUnsupported)
                }
            }
            _ => {
                let s = self.connect()?;
                s.set_read_timeout(io_timeout)?;
                Ok(s)
            }
        }
    }

    /// Listens on a `tcp://` (loopback only) or `unix://` endpoint. A stale unix socket
    /// at the path is replaced; any other file there is left alone (binding then fails
    /// with `AddrInUse`). See [`Endpoint::bind_with`].
    pub fn bind(&self) -> io::Result<Listener> {
        self.bind_with(&Security::plaintext())
            .map_err(SecurityError::into_io)
    }

    /// Listens under `security`: `tls://` needs TLS credentials; plaintext `tcp://` on
    /// a non-loopback address needs [`Security::insecure`] ([`SecurityError::PlaintextRefused`]
    /// says why).
    pub fn bind_with(&self, security: &Security) -> Result<Listener, SecurityError> {
        match self {
            Endpoint::Tcp(addr) => {
                security.check_plaintext_listen(addr)?;
                Ok(Listener::Tcp(TcpListener::bind(addr)?))
            }
            Endpoint::Tls { addr, .. } => {
                if !cfg!(feature = "tls") {
                    return Err(SecurityError::TlsUnsupported);
                }
                if !security.has_tls() {
                    return Err(SecurityError::TlsNotConfigured { url: self.url() });
                }
                Ok(Listener::Tls(TcpListener::bind(addr)?))
            }
            Endpoint::Unix(path) => Ok(Listener::Unix(listen_unix(path)?)),
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale socket from an earlier receiver,
/// never any other kind of file.
pub(crate) fn listen_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// TCP, each connection under mutual TLS ([`Listener::accept_with`]).
    Tls(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener),
}

impl Listener {
    /// Waits for one connection (plaintext; a TLS listener needs [`Listener::accept_with`]).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Tls(_) => Err(SecurityError::TlsNotConfigured { url: self.url()? }.into_io()),
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// Waits for one connection and secures it before anything else reads from it: on
    /// a TLS listener, the handshake and the client's authorization (within the
    /// handshake deadline); on a plaintext TCP listener, a check that the peer does not
    /// speak TLS. A plaintext peer on a TLS listener is handed to `on_plaintext` first
    /// (to answer it in its own protocol: an ABORT, a reject reply), then refused. The
    /// read timeout is `io_timeout` afterwards.
    pub fn accept_with(
        &self,
        security: &Security,
        io_timeout: Option<Duration>,
        on_plaintext: impl FnOnce(&mut Stream, &SecurityError),
    ) -> Result<Stream, SecurityError> {
        match self {
            Listener::Tls(l) => {
                let (tcp, _) = l.accept()?;
                tcp.set_nodelay(true)?;
                #[cfg(feature = "tls")]
                {
                    let config =
                        security
                            .tls_config()
                            .ok_or_else(|| SecurityError::TlsNotConfigured {
                                url: format!(
                                    "tls://{}",
                                    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                                ),
                            })?;
                    if !tls::looks_like_tls(&tcp, config.handshake_timeout())? {
                        let e = SecurityError::Tls(tls::TlsError::PlaintextPeer);
                        let mut s = Stream::Tcp(tcp);
                        let _ = s.set_read_timeout(Some(config.handshake_timeout()));
                        on_plaintext(&mut s, &e);
                        // Let the answer arrive before the close: closing with the
                        // peer's bytes unread would reset the connection.
                        let _ = s.shutdown_write();
                        drain_briefly(&mut s);
                        return Err(e);
                    }
                    let tls = config.accept(tcp, io_timeout)?;
                    Ok(Stream::Tls(Box::new(tls)))
                }
                #[cfg(not(feature = "tls"))]
                {
                    let _ = (tcp, on_plaintext);
                    Err(SecurityError::TlsUnsupported)
                }
            }
            Listener::Tcp(l) => {
                let (tcp, _) = l.accept()?;
                tcp.set_nodelay(true)?;
                if first_byte_is_tls(&tcp, security.handshake_timeout())? {
                    return Err(SecurityError::TlsPeerOnPlaintext);
                }
                tcp.set_read_timeout(io_timeout)?;
                Ok(Stream::Tcp(tcp))
            }
            Listener::Unix(l) => {
                let s = l.accept()?.0;
                s.set_read_timeout(io_timeout)?;
                Ok(Stream::Unix(s))
            }
        }
    }

    /// Makes [`accept`](Self::accept) return `WouldBlock` instead of waiting (the
    /// connections it returns still block).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) | Listener::Tls(l) => l.set_nonblocking(nonblocking),
            Listener::Unix(l) => l.set_nonblocking(nonblocking),
        }
    }

    /// The URL a peer connects to (with the actual port for `tcp://…:0`).
    pub fn url(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => Ok(format!("tcp://{}", l.local_addr()?)),
            Listener::Tls(l) => Ok(format!("tls://{}", l.local_addr()?)),
            Listener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr
                    .as_pathname()
                    .ok_or_else(|| io::Error::other("unnamed unix socket"))?;
                Ok(format!("unix://{}", path.display()))
            }
        }
    }
}

/// Whether a plaintext peer's first byte starts a TLS handshake (a TLS client that
/// should have been given a `tls://` listener). Waits at most `timeout` for it.
fn first_byte_is_tls(tcp: &TcpStream, timeout: Duration) -> io::Result<bool> {
    tcp.set_read_timeout(Some(timeout))?;
    let mut first = [0u8; 1];
    match tcp.peek(&mut first) {
        Ok(1) => Ok(first[0] == TLS_HANDSHAKE_RECORD),
        // Closed or silent: the protocol above says so in its own words.
        Ok(_) => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// First byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Reads and discards what a refused peer still sends, for at most a second and
/// 1 MiB, so that closing does not reset the connection under our last answer.
#[cfg(feature = "tls")]
fn drain_briefly(s: &mut Stream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16 << 10];
    let mut total = 0usize;
    while started.elapsed() < Duration::from_secs(1) && total < (1 << 20) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// TCP under mutual TLS.
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream>),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Sets the read timeout: a peer that goes silent becomes an error, not a hang.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.tcp().set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    /// Sets the write timeout: a peer that stops reading becomes an error, not a hang.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.tcp().set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Shuts down the writing half (the peer reads end of stream after what was sent).
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.tcp().shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    /// The socket, if bytes read from it are the stream's own bytes (`tcp://` and
    /// `unix://`; `None` for `tls://`, whose socket carries records). For
    /// [`Channel::with_socket`](crate::protocol::Channel::with_socket).
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Stream::Tcp(s) => Some(s.as_fd()),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => None,
            Stream::Unix(s) => Some(s.as_fd()),
        }
    }

    /// The TLS session, on a `tls://` connection.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&TlsStream> {
        match self {
            Stream::Tls(s) => Some(s),
            _ => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix_and_rejects_the_rest() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:4444").unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Endpoint::parse("unix:///tmp/x.sock").unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        for bad in [
            "tcp://127.0.0.1",
            "tcp://:4444",
            "tcp://127.0.0.1:4444/path",
        ] {
            assert!(
                matches!(
                    Endpoint::parse(bad),
                    Err(MigratableError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            Endpoint::parse("unix://"),
            Err(MigratableError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Endpoint::parse("ftp://host/x"),
            Err(MigratableError::UnsupportedScheme { scheme, .. }) if scheme == "ftp"
        ));
    }

    #[test]
    fn binding_replaces_a_stale_socket_but_never_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migrate.sock");
        let url = format!("unix://{}", path.display());
        drop(Endpoint::parse(&url).unwrap().bind().unwrap());
        // The socket file stays behind: a second receiver replaces it.
        Endpoint::parse(&url).unwrap().bind().unwrap();

        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"precious").unwrap();
        let url = format!("unix://{}", disk.display());
        assert!(Endpoint::parse(&url).unwrap().bind().is_err());
        assert_eq!(std::fs::read(&disk).unwrap(), b"precious");
    }
}
