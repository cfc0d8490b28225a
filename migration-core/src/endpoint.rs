//! Socket endpoints named by URL: `tcp://host:port` and `unix:///path`.
//!
//! The live-migration entry points ([`send_migration`](crate::precopy::send_migration),
//! [`receive_migration`](crate::destination::receive_migration)) connect and listen
//! through these; any other scheme is [`MigratableError::UnsupportedScheme`].

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::MigratableError;

/// A parsed socket endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`
    Tcp(String),
    /// `unix:///path`
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://host:port` or `unix:///absolute/path` (the snapshot transports
    /// use it too, beside their own `file://`).
    pub fn parse(url: &str) -> Result<Self, MigratableError> {
        let invalid = |reason: &str| MigratableError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        match parsed.scheme() {
            "tcp" => {
                let host = parsed
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| invalid("no host: use tcp://host:port"))?;
                let port = parsed
                    .port()
                    .ok_or_else(|| invalid("no port: use tcp://host:port"))?;
                if parsed.path().len() > 1 {
                    return Err(invalid("a tcp URL has no path: use tcp://host:port"));
                }
                Ok(Endpoint::Tcp(format!("{host}:{port}")))
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

    /// Connects to the endpoint.
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        }
    }

    /// Listens on the endpoint. A stale unix socket at the path is replaced; any other
    /// file there is left alone (binding then fails with `AddrInUse`).
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr)?)),
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
    /// Unix stream socket.
    Unix(UnixListener),
}

impl Listener {
    /// Waits for one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// The URL a peer connects to (with the actual port for `tcp://…:0`).
    pub fn url(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => Ok(format!("tcp://{}", l.local_addr()?)),
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

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Sets the read timeout: a peer that goes silent becomes an error, not a hang.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
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
