//! Who may connect: the security policy of a socket endpoint, and its refusals.
//!
//! A [`Security`] goes with every endpoint that opens TCP: live migration
//! ([`send_migration_with`](crate::precopy::send_migration_with),
//! [`receive_migration_with`](crate::destination::receive_migration_with)) and the
//! snapshot transports ([`send_snapshot_secure`](crate::transport::send_snapshot_secure),
//! [`recv_snapshot_secure`](crate::transport::recv_snapshot_secure)).
//!
//! - `tls://host:port` needs TLS credentials ([`Security::tls`], feature `tls`): mutual
//!   TLS, see [`crate::tls`].
//! - `tcp://host:port` is plaintext. Listening on it is allowed on a loopback address
//!   only, unless the caller opts in with [`Security::insecure`]: whoever reaches a
//!   plaintext destination can push a whole VM into it.
//! - `unix:///path` is local: file permissions decide who connects (docs/security.md).
//!
//! The default, [`Security::plaintext`], keeps every existing loopback and unix use
//! working and refuses to listen in plaintext where the network can reach it.

use std::io;
use std::net::ToSocketAddrs;
#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use crate::tls::{TlsConfig, TlsError};

/// How long a listener waits for a plaintext peer's first byte (to tell TLS from
/// plaintext) when no TLS configuration sets a handshake deadline.
pub const PLAINTEXT_PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// The security policy of an endpoint: TLS credentials, or plaintext (on loopback
/// only unless [`Security::insecure`]).
#[derive(Clone, Debug, Default)]
pub struct Security {
    #[cfg(feature = "tls")]
    tls: Option<Arc<TlsConfig>>,
    allow_plaintext: bool,
}

impl Security {
    /// Plaintext, listening on loopback addresses and unix sockets only (the default).
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Plaintext on any address: the caller accepts that anyone who can reach the port
    /// can send a VM to it, and read the VM it sends (`--insecure`).
    pub fn insecure() -> Self {
        Self {
            allow_plaintext: true,
            ..Self::default()
        }
    }

    /// Mutual TLS with `config`, for `tls://` URLs.
    #[cfg(feature = "tls")]
    pub fn tls(config: impl Into<Arc<TlsConfig>>) -> Self {
        Self {
            tls: Some(config.into()),
            allow_plaintext: false,
        }
    }

    /// The TLS credentials, if any.
    #[cfg(feature = "tls")]
    pub fn tls_config(&self) -> Option<&Arc<TlsConfig>> {
        self.tls.as_ref()
    }

    /// Whether TLS credentials are set.
    pub fn has_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Whether plaintext listening on non-loopback addresses was allowed.
    pub fn allows_plaintext(&self) -> bool {
        self.allow_plaintext
    }

    /// How long a listener waits for a peer's first bytes and handshake.
    pub fn handshake_timeout(&self) -> Duration {
        #[cfg(feature = "tls")]
        if let Some(t) = &self.tls {
            return t.handshake_timeout();
        }
        PLAINTEXT_PEEK_TIMEOUT
    }

    /// Checks that listening on the plaintext TCP address `addr` is allowed.
    pub fn check_plaintext_listen(&self, addr: &str) -> Result<(), SecurityError> {
        if self.has_tls() {
            return Err(SecurityError::TlsNotRequested {
                addr: addr.to_owned(),
            });
        }
        if self.allow_plaintext || is_loopback(addr) {
            Ok(())
        } else {
            Err(SecurityError::PlaintextRefused {
                addr: addr.to_owned(),
            })
        }
    }
}

/// Whether every address `addr` (`host:port`) resolves to is a loopback address.
/// A name that does not resolve is not loopback.
pub fn is_loopback(addr: &str) -> bool {
    match addr.to_socket_addrs() {
        Ok(addrs) => {
            let mut any = false;
            for a in addrs {
                if !a.ip().is_loopback() {
                    return false;
                }
                any = true;
            }
            any
        }
        Err(_) => false,
    }
}

/// Why an endpoint refused to listen or a connection was refused for security.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// Listening in plaintext on a non-loopback address without opting in.
    #[error(
        "refusing to listen in plaintext on {addr}: anyone who can reach it could send a VM to this host; \
         use tls://{addr} with TLS credentials, a loopback address or a unix:// socket, \
         or opt in to plaintext explicitly (Security::insecure, --insecure)"
    )]
    PlaintextRefused {
        /// The address asked for.
        addr: String,
    },
    /// A `tls://` URL without TLS credentials.
    #[error("{url} needs TLS credentials (a TlsConfig, --tls-dir)")]
    TlsNotConfigured {
        /// The URL.
        url: String,
    },
    /// TLS credentials given with a plaintext `tcp://` URL: one of the two is a mistake.
    #[error("TLS credentials given but tcp://{addr} is plaintext: use tls://{addr}")]
    TlsNotRequested {
        /// The address.
        addr: String,
    },
    /// This build has no TLS (migration-core without the `tls` feature).
    #[error("tls:// is not supported: migration-core was built without the `tls` feature")]
    TlsUnsupported,
    /// A TLS client connected to a plaintext listener.
    #[error(
        "the peer speaks TLS but this endpoint listens in plaintext (use tls:// on both sides)"
    )]
    TlsPeerOnPlaintext,
    /// The TLS handshake or authorization failed.
    #[cfg(feature = "tls")]
    #[error("TLS: {0}")]
    Tls(TlsError),
    /// The socket failed.
    #[error("connection: {0}")]
    Io(io::Error),
}

// By hand, not `#[from]`: the message already quotes the inner error, and a `source`
// would print it twice in a chain (`{:#}`).
#[cfg(feature = "tls")]
impl From<TlsError> for SecurityError {
    fn from(e: TlsError) -> Self {
        Self::Tls(e)
    }
}

impl From<io::Error> for SecurityError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl SecurityError {
    /// This error inside an `io::Error`, for interfaces that return one.
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Io(e) => e,
            other => {
                let kind = match other {
                    Self::PlaintextRefused { .. } => io::ErrorKind::PermissionDenied,
                    Self::TlsNotConfigured { .. }
                    | Self::TlsNotRequested { .. }
                    | Self::TlsUnsupported => io::ErrorKind::InvalidInput,
                    _ => io::ErrorKind::ConnectionRefused,
                };
                io::Error::new(kind, other)
            }
        }
    }

    /// The TLS reason, if TLS is why.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<&TlsError> {
        match self {
            Self::Tls(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_listens_on_loopback_only_unless_insecure() {
        let p = Security::plaintext();
        for ok in ["127.0.0.1:0", "[::1]:0", "localhost:0"] {
            p.check_plaintext_listen(ok).unwrap();
        }
        for refused in ["0.0.0.0:4444", "[::]:4444", "192.0.2.1:4444"] {
            let e = p.check_plaintext_listen(refused).unwrap_err();
            assert!(
                matches!(e, SecurityError::PlaintextRefused { .. }),
                "{refused}"
            );
            assert!(e.to_string().contains("--insecure"), "{e}");
        }
        Security::insecure()
            .check_plaintext_listen("0.0.0.0:4444")
            .unwrap();
    }
}
