//! Mutual TLS for `tls://host:port` endpoints (feature `tls`): credentials, the peer
//! allowlist, the handshake and the encrypted stream.
//!
//! Both ends authenticate. The listening side (a migration destination, a snapshot
//! receiver) presents its *server* certificate and requires a *client* certificate
//! that chains to its CA; the connecting side verifies the server certificate against
//! the same CA and against the name it connects to. An optional allowlist of
//! [`PeerIdentity`]s narrows who is accepted beyond "has a certificate from our CA"
//! (QEMU's `tls-authz`). TLS 1.3 only, rustls with the `ring` provider.
//!
//! After the handshake the listening side sends the 8 bytes [`AUTHORIZED`] and the
//! connecting side waits for them (within the handshake deadline) before it sends
//! anything: in TLS 1.3 a client finishes its handshake before the server has checked
//! the client's certificate, and this makes a refusal reach the client as a named error
//! before any migration bytes leave it (`docs/protocol.md`, `docs/security.md`).
//!
//! ```no_run
//! use migration_core::tls::{PeerIdentity, TlsConfig};
//!
//! // Cloud Hypervisor's layout: ca-cert.pem, server-cert.pem, server-key.pem,
//! // client-cert.pem, client-key.pem.
//! let tls = TlsConfig::from_dir("/etc/vmm/tls")?
//!     .with_allowlist(vec![PeerIdentity::Name("host-b.example".into())]);
//! # Ok::<(), migration_core::tls::TlsError>(())
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct,
    DistinguishedName, RootCertStore, ServerConfig, ServerConnection, SignatureScheme, StreamOwned,
};

/// What the listening side sends once the handshake and its allowlist check passed.
pub const AUTHORIZED: [u8; 8] = *b"VMTLSOK1";
/// Default deadline of the whole handshake (TCP accepted to [`AUTHORIZED`] received).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest PEM file [`TlsConfig::from_dir`] reads.
pub const MAX_PEM_FILE: u64 = 1 << 20;
/// First byte of a TLS record carrying a handshake message (a ClientHello).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a TLS connection was refused or broke. Each variant names the reason; the
/// peer's side of the same refusal reads [`TlsError::PeerAlert`] with its meaning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer sent plaintext to a TLS endpoint.
    #[error("the peer speaks plaintext; this endpoint requires TLS (connect with tls://host:port and TLS credentials)")]
    PlaintextPeer,
    /// The peer answered the ClientHello with something that is not TLS.
    #[error("the peer did not answer in TLS: it is probably a plaintext tcp:// endpoint")]
    PeerNotTls,
    /// The peer closed the connection in the middle of the handshake.
    #[error("the peer closed the connection during the TLS handshake (a plaintext endpoint, or it refused us without an alert)")]
    HandshakeEof,
    /// The client presented no certificate: mutual TLS requires one.
    #[error("the peer presented no client certificate (mutual TLS requires one)")]
    NoPeerCertificate,
    /// The peer's certificate does not chain to our CA.
    #[error("the peer's certificate is not signed by our CA (unknown issuer)")]
    UnknownCa,
    /// The peer's certificate has expired.
    #[error("the peer's certificate has expired")]
    Expired,
    /// The peer's certificate is not valid yet.
    #[error("the peer's certificate is not valid yet")]
    NotYetValid,
    /// The server's certificate is not valid for the name we connected to.
    #[error("the peer's certificate is not valid for the name `{expected}` (wrong server name)")]
    WrongName {
        /// The name we expected (the URL's host or [`TlsConfig::with_server_name`]).
        expected: String,
    },
    /// The peer's certificate is valid but its identity is not on the allowlist.
    #[error("the peer's certificate is valid but not on the allowlist (it presents {presented})")]
    NotAllowed {
        /// The identities the certificate presents (escaped).
        presented: String,
    },
    /// The peer refused us with a TLS alert.
    #[error("the peer refused the TLS connection: alert {alert} ({meaning})")]
    PeerAlert {
        /// The alert's name.
        alert: String,
        /// What it means for us.
        meaning: &'static str,
    },
    /// A record failed its integrity check: the stream was altered in transit.
    #[error("a TLS record failed its integrity check (bad record MAC): the stream was altered in transit")]
    BadRecordMac,
    /// The handshake did not complete in time.
    #[error("the TLS handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// No certificate and key for this role.
    #[error("no {0} certificate and key configured")]
    NoIdentity(&'static str),
    /// The name to verify the server by is not a DNS name or an IP address.
    #[error("`{0}` is not a valid server name")]
    BadServerName(String),
    /// Bad credentials: unreadable PEM, no CA, a key that does not match.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Another TLS failure.
    #[error("TLS: {0}")]
    Other(rustls::Error),
    /// The socket failed during the handshake.
    #[error("TLS handshake I/O: {0}")]
    Io(#[from] io::Error),
}

impl TlsError {
    /// The TLS error inside an I/O error returned by a [`TlsStream`] read or write.
    pub fn from_io(e: &io::Error) -> Option<&TlsError> {
        e.get_ref()?.downcast_ref::<TlsError>()
    }

    fn from_rustls(e: rustls::Error, expected_name: &str) -> Self {
        use rustls::Error as E;
        use CertificateError as C;
        match e {
            E::NoCertificatesPresented => Self::NoPeerCertificate,
            E::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => Self::UnknownCa,
                C::Expired | C::ExpiredContext { .. } => Self::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Self::NotYetValid,
                C::NotValidForName | C::NotValidForNameContext { .. } => Self::WrongName {
                    expected: expected_name.to_owned(),
                },
                C::ApplicationVerificationFailure => Self::NotAllowed {
                    presented: "an identity not on the list".into(),
                },
                other => Self::Other(E::InvalidCertificate(other)),
            },
            E::DecryptError => Self::BadRecordMac,
            E::InvalidMessage(_) => Self::PeerNotTls,
            E::AlertReceived(a) => Self::PeerAlert {
                alert: format!("{a:?}"),
                meaning: alert_meaning(a),
            },
            other => Self::Other(other),
        }
    }
}

fn alert_meaning(alert: AlertDescription) -> &'static str {
    use AlertDescription as A;
    match alert {
        A::CertificateRequired => "the peer requires a client certificate and we sent none",
        A::UnknownCA => "the peer does not trust the CA of our certificate",
        A::CertificateExpired => "the peer says our certificate has expired or is not valid yet",
        A::BadCertificate => "the peer rejected our certificate (bad, or not for its name)",
        A::AccessDenied => "the peer refused our identity: we are not on its allowlist",
        A::BadRecordMac => {
            "a record failed the peer's integrity check: the stream was altered in transit"
        }
        A::DecryptError => "the peer could not verify our handshake signature",
        A::ProtocolVersion | A::HandshakeFailure => "no TLS version or cipher suite in common",
        A::DecodeError | A::UnexpectedMessage => "the peer could not parse what it received",
        _ => "see the peer's log",
    }
}

fn push_new(list: &mut Vec<PeerIdentity>, id: PeerIdentity) {
    if !list.contains(&id) {
        list.push(id);
    }
}

/// An identity on the allowlist: who, beyond "has a certificate from our CA", may connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The certificate's subject common name or one of its DNS subject alternative
    /// names equals this (ASCII case-insensitive).
    Name(String),
    /// SHA-256 of the certificate's DER-encoded SubjectPublicKeyInfo (pins the key:
    /// survives re-issuing the certificate, not re-keying).
    SpkiSha256([u8; 32]),
}

impl PeerIdentity {
    /// Parses `name:host.example` or `spki-sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<Self, TlsError> {
        let bad = || {
            TlsError::Config(format!(
                "peer identity {:?}: expected name:<CN or DNS name> or spki-sha256:<64 hex digits>",
                text
            ))
        };
        if let Some(name) = text.strip_prefix("name:") {
            if name.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Name(name.to_owned()));
        }
        let hex = text.strip_prefix("spki-sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self::SpkiSha256(out))
    }

    /// The identities a DER certificate presents: its common names and DNS names,
    /// then the hash of its public key.
    pub fn of_certificate(der: &[u8]) -> Result<Vec<PeerIdentity>, TlsError> {
        use x509_cert::der::{Decode, Encode};
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| TlsError::Config(format!("cannot parse certificate: {e}")))?;
        let tbs = &cert.tbs_certificate;
        let mut out = Vec::new();
        let cn = x509_cert::der::asn1::ObjectIdentifier::new_unwrap("2.5.4.3");
        for rdn in tbs.subject.0.iter() {
            for atv in rdn.0.iter() {
                if atv.oid == cn {
                    if let Ok(s) = std::str::from_utf8(atv.value.value()) {
                        push_new(&mut out, Self::Name(s.to_owned()));
                    }
                }
            }
        }
        if let Ok(Some((_, san))) = tbs.get::<x509_cert::ext::pkix::SubjectAltName>() {
            for name in san.0 {
                if let x509_cert::ext::pkix::name::GeneralName::DnsName(dns) = name {
                    push_new(&mut out, Self::Name(dns.to_string()));
                }
            }
        }
        let spki = tbs
            .subject_public_key_info
            .to_der()
            .map_err(|e| TlsError::Config(format!("cannot encode the public key: {e}")))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        out.push(Self::SpkiSha256(hash));
        Ok(out)
    }

    fn matches(&self, other: &PeerIdentity) -> bool {
        match (self, other) {
            (Self::Name(a), Self::Name(b)) => a.eq_ignore_ascii_case(b),
            (Self::SpkiSha256(a), Self::SpkiSha256(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for PeerIdentity {
    /// `name:…` (escaped: it comes from a peer) or `spki-sha256:…`, as [`PeerIdentity::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "name:{}", n.escape_debug()),
            Self::SpkiSha256(h) => {
                f.write_str("spki-sha256:")?;
                h.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

/// A certificate chain and its private key.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    fn from_pem(cert: &[u8], key: &[u8], what: &str) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Config(format!("{what} certificate: {e}")))?;
        if chain.is_empty() {
            return Err(TlsError::Config(format!(
                "{what} certificate: no certificate in the PEM"
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| TlsError::Config(format!("{what} key: {e}")))?;
        Ok(Self { chain, key })
    }

    fn clone_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }
}

/// TLS credentials and policy: the CA both sides trust, this host's server and/or
/// client certificate, the allowlist, the server name to verify and the handshake
/// deadline. Cheap to share behind an `Arc`.
pub struct TlsConfig {
    roots: Arc<RootCertStore>,
    server: Option<Identity>,
    client: Option<Identity>,
    allowlist: Vec<PeerIdentity>,
    server_name: Option<String>,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.roots.len())
            .field("server_identity", &self.server.is_some())
            .field("client_identity", &self.client.is_some())
            .field("allowlist", &self.allowlist)
            .field("server_name", &self.server_name)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// ring's provider, TLS 1.3 suites only, AES-128-GCM first (the fastest with AES-NI;
/// both ends are ours, so the listener's order decides).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsConfig {
    /// A configuration that trusts the CA certificates in `ca_pem` (one or more PEM
    /// certificates) and has no identity yet.
    pub fn new(ca_pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Config("no CA certificate in the PEM".into()));
        }
        Ok(Self {
            roots: Arc::new(roots),
            server: None,
            client: None,
            allowlist: Vec::new(),
            server_name: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// Reads a directory laid out like Cloud Hypervisor's: `ca-cert.pem` (required),
    /// `server-cert.pem` + `server-key.pem` (to listen), `client-cert.pem` +
    /// `client-key.pem` (to connect). A pair that is absent is skipped; a half pair is
    /// an error. Each file is at most [`MAX_PEM_FILE`] bytes.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let read = |name: &str| -> Result<Option<Vec<u8>>, TlsError> {
            let path = dir.join(name);
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(TlsError::Config(format!("{}: {e}", path.display())));
                }
            };
            let mut bytes = Vec::new();
            file.take(MAX_PEM_FILE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
            if bytes.len() as u64 > MAX_PEM_FILE {
                return Err(TlsError::Config(format!(
                    "{}: over {MAX_PEM_FILE} bytes",
                    path.display()
                )));
            }
            Ok(Some(bytes))
        };
        let ca = read("ca-cert.pem")?
            .ok_or_else(|| TlsError::Config(format!("{}: no ca-cert.pem", dir.display())))?;
        let mut config = Self::new(&ca)?;
        for (role, cert, key) in [
            ("server", "server-cert.pem", "server-key.pem"),
            ("client", "client-cert.pem", "client-key.pem"),
        ] {
            match (read(cert)?, read(key)?) {
                (None, None) => {}
                (Some(c), Some(k)) => {
                    let identity = Identity::from_pem(&c, &k, role)?;
                    if role == "server" {
                        config.server = Some(identity);
                    } else {
                        config.client = Some(identity);
                    }
                }
                _ => {
                    return Err(TlsError::Config(format!(
                        "{}: {cert} and {key} go together",
                        dir.display()
                    )))
                }
            }
        }
        Ok(config)
    }

    /// Sets the certificate chain (PEM, leaf first) and key this host presents when it listens.
    pub fn with_server_identity(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        self.server = Some(Identity::from_pem(cert_pem, key_pem, "server")?);
        Ok(self)
    }

    /// Sets the certificate chain (PEM, leaf first) and key this host presents when it connects.
    pub fn with_client_identity(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        self.client = Some(Identity::from_pem(cert_pem, key_pem, "client")?);
        Ok(self)
    }

    /// Accepts only peers whose certificate presents one of `identities` (on top of
    /// chaining to the CA). Empty: every peer with a valid certificate.
    pub fn with_allowlist(mut self, identities: Vec<PeerIdentity>) -> Self {
        self.allowlist = identities;
        self
    }

    /// The name a server's certificate must be valid for, instead of the URL's host
    /// (for example a DNS name while connecting to an IP address).
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Deadline of the whole handshake (default [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn allowlist(&self) -> Option<Arc<Allowlist>> {
        (!self.allowlist.is_empty()).then(|| {
            Arc::new(Allowlist {
                allowed: self.allowlist.clone(),
                refused: Mutex::new(None),
            })
        })
    }

    /// Client side: TLS over `tcp`, verifying the server as `host` (or the configured
    /// server name), then waiting for [`AUTHORIZED`]. The whole exchange has the
    /// handshake deadline; afterwards the socket's read timeout is `io_timeout`.
    pub fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        io_timeout: Option<Duration>,
    ) -> Result<TlsStream, TlsError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        // `[::1]` in a URL is the address `::1`.
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_owned())
            .map_err(|_| TlsError::BadServerName(name.to_owned()))?;
        let provider = provider();
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let allow = self.allowlist();
        let verifier = Arc::new(ServerVerifier {
            inner,
            allow: allow.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            Some(id) => {
                let (chain, key) = id.clone_identity();
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        let conn = ClientConnection::new(Arc::new(config), server_name)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let deadline = Instant::now() + self.handshake_timeout;
        let mut stream = StreamOwned::new(conn, tcp);
        let started = Instant::now();
        let fail = |e: TlsError| refused(e, allow.as_deref());
        handshake(
            &mut stream.conn,
            &mut stream.sock,
            deadline,
            self.handshake_timeout,
            name,
        )
        .map_err(fail)?;
        // Wait for the server's verdict on our certificate.
        let mut token = [0u8; AUTHORIZED.len()];
        read_exact_by(
            &mut stream,
            &mut token,
            deadline,
            self.handshake_timeout,
            name,
        )
        .map_err(fail)?;
        if token != AUTHORIZED {
            return Err(TlsError::PeerNotTls);
        }
        stream.sock.set_read_timeout(io_timeout)?;
        stream.sock.set_write_timeout(None)?;
        Ok(TlsStream::new(Conn::Client(stream), started.elapsed()))
    }

    /// Server side: TLS over an accepted `tcp`, requiring a client certificate from our
    /// CA (and on the allowlist), then sending [`AUTHORIZED`]. The caller checks for a
    /// plaintext peer first ([`looks_like_tls`]).
    pub fn accept(
        &self,
        tcp: TcpStream,
        io_timeout: Option<Duration>,
    ) -> Result<TlsStream, TlsError> {
        let identity = self.server.as_ref().ok_or(TlsError::NoIdentity("server"))?;
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let allow = self.allowlist();
        let verifier = Arc::new(ClientVerifier {
            inner,
            allow: allow.clone(),
        });
        let (chain, key) = identity.clone_identity();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("server certificate: {e}")))?;
        // No resumption: every connection authenticates in full.
        config.send_tls13_tickets = 0;
        let conn =
            ServerConnection::new(Arc::new(config)).map_err(|e| TlsError::Config(e.to_string()))?;
        let deadline = Instant::now() + self.handshake_timeout;
        let started = Instant::now();
        let mut stream = StreamOwned::new(conn, tcp);
        handshake(
            &mut stream.conn,
            &mut stream.sock,
            deadline,
            self.handshake_timeout,
            "",
        )
        .map_err(|e| refused(e, allow.as_deref()))?;
        stream
            .sock
            .set_write_timeout(Some(remaining(deadline, self.handshake_timeout)?))?;
        stream.write_all(&AUTHORIZED)?;
        stream.flush()?;
        stream.sock.set_read_timeout(io_timeout)?;
        stream.sock.set_write_timeout(None)?;
        Ok(TlsStream::new(Conn::Server(stream), started.elapsed()))
    }
}

/// Whether the first byte waiting on `tcp` starts a TLS handshake record, without
/// consuming it. Waits for at most `timeout`; a peer that closed is an error.
pub fn looks_like_tls(tcp: &TcpStream, timeout: Duration) -> Result<bool, TlsError> {
    tcp.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let mut first = [0u8; 1];
    match tcp.peek(&mut first) {
        Ok(0) => Err(TlsError::HandshakeEof),
        Ok(_) => Ok(first[0] == TLS_HANDSHAKE_RECORD),
        Err(e) if is_timeout(&e) => Err(TlsError::HandshakeTimeout(timeout)),
        Err(e) => Err(e.into()),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn remaining(deadline: Instant, total: Duration) -> Result<Duration, TlsError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(TlsError::HandshakeTimeout(total))
    } else {
        Ok(left)
    }
}

/// The allowlist's refusal, said by name rather than as rustls' generic failure.
fn refused(e: TlsError, allow: Option<&Allowlist>) -> TlsError {
    match (e, allow) {
        (TlsError::NotAllowed { .. }, Some(a)) => TlsError::NotAllowed {
            presented: a
                .refused
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_else(|| "an identity not on the list".into()),
        },
        (other, _) => other,
    }
}

/// Drives the handshake by hand so that every read has the time left until `deadline`
/// as its timeout: a peer that trickles bytes cannot stretch it.
fn handshake<C, D>(
    conn: &mut C,
    sock: &mut TcpStream,
    deadline: Instant,
    total: Duration,
    name: &str,
) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        while conn.wants_write() {
            sock.set_write_timeout(Some(remaining(deadline, total)?))?;
            conn.write_tls(sock).map_err(|e| timeout_or(e, total))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        sock.set_read_timeout(Some(remaining(deadline, total)?))?;
        match conn.read_tls(sock) {
            Ok(0) => return Err(TlsError::HandshakeEof),
            Ok(_) => {}
            Err(e) => return Err(timeout_or(e, total)),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (rustls queued the alert), best effort.
            let _ = conn.write_tls(sock);
            return Err(TlsError::from_rustls(e, name));
        }
    }
    while conn.wants_write() {
        sock.set_write_timeout(Some(remaining(deadline, total)?))?;
        conn.write_tls(sock).map_err(|e| timeout_or(e, total))?;
    }
    Ok(())
}

fn timeout_or(e: io::Error, total: Duration) -> TlsError {
    use io::ErrorKind as K;
    match e.kind() {
        _ if is_timeout(&e) => TlsError::HandshakeTimeout(total),
        // A peer that closed with our ClientHello unread resets the connection.
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            TlsError::HandshakeEof
        }
        _ => TlsError::Io(e),
    }
}

fn read_exact_by(
    stream: &mut StreamOwned<ClientConnection, TcpStream>,
    buf: &mut [u8],
    deadline: Instant,
    total: Duration,
    name: &str,
) -> Result<(), TlsError> {
    let mut done = 0;
    while done < buf.len() {
        stream
            .sock
            .set_read_timeout(Some(remaining(deadline, total)?))?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(TlsError::HandshakeEof),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(map_io(e, name)),
        }
    }
    Ok(())
}

/// An I/O error from rustls' stream: the TLS reason named, else the I/O error.
fn map_io(e: io::Error, name: &str) -> TlsError {
    if is_timeout(&e) {
        return TlsError::Io(e);
    }
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(r) => TlsError::from_rustls(r, name),
        None => TlsError::Io(e),
    }
}

/// Turns rustls' I/O errors into ones that carry a [`TlsError`] (see [`TlsError::from_io`]).
fn wrap_io(e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        let kind = e.kind();
        io::Error::new(kind, map_io(e, ""))
    } else {
        e
    }
}

struct Allowlist {
    allowed: Vec<PeerIdentity>,
    /// What the last refused certificate presented, for the error message.
    refused: Mutex<Option<String>>,
}

impl fmt::Debug for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.allowed).finish()
    }
}

impl Allowlist {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let presented = PeerIdentity::of_certificate(cert.as_ref()).unwrap_or_default();
        if presented
            .iter()
            .any(|p| self.allowed.iter().any(|a| a.matches(p)))
        {
            return Ok(());
        }
        let text: Vec<String> = presented.iter().map(|p| p.to_string()).collect();
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(text.join(", "));
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

#[derive(Debug)]
struct ServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    allow: Option<Arc<Allowlist>>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if let Some(a) = &self.allow {
            a.check(end_entity)?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Option<Arc<Allowlist>>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(a) = &self.allow {
            a.check(end_entity)?;
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

enum Conn {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

/// An authenticated, encrypted connection over TCP. Errors from its reads and writes
/// carry a [`TlsError`] where TLS is the reason ([`TlsError::from_io`]).
pub struct TlsStream {
    conn: Conn,
    handshake: Duration,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field(
                "role",
                &if matches!(self.conn, Conn::Client(_)) {
                    "client"
                } else {
                    "server"
                },
            )
            .field("cipher_suite", &self.cipher_suite())
            .field("handshake", &self.handshake)
            .finish()
    }
}

impl TlsStream {
    fn new(conn: Conn, handshake: Duration) -> Self {
        Self { conn, handshake }
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match &self.conn {
            Conn::Client(s) => &s.sock,
            Conn::Server(s) => &s.sock,
        }
    }

    /// The negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub fn cipher_suite(&self) -> String {
        let suite = match &self.conn {
            Conn::Client(s) => s.conn.negotiated_cipher_suite(),
            Conn::Server(s) => s.conn.negotiated_cipher_suite(),
        };
        suite.map_or_else(|| "none".into(), |s| format!("{:?}", s.suite()))
    }

    /// How long the handshake took, from the first byte to [`AUTHORIZED`].
    pub fn handshake_time(&self) -> Duration {
        self.handshake
    }

    /// The identities the peer's certificate presents.
    pub fn peer_identities(&self) -> Vec<PeerIdentity> {
        let certs = match &self.conn {
            Conn::Client(s) => s.conn.peer_certificates(),
            Conn::Server(s) => s.conn.peer_certificates(),
        };
        certs
            .and_then(|c| c.first())
            .and_then(|c| PeerIdentity::of_certificate(c.as_ref()).ok())
            .unwrap_or_default()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.conn {
            Conn::Client(s) => s.read(buf),
            Conn::Server(s) => s.read(buf),
        }
        .map_err(wrap_io)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.conn {
            Conn::Client(s) => s.write(buf),
            Conn::Server(s) => s.write(buf),
        }
        .map_err(wrap_io)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.conn {
            Conn::Client(s) => s.flush(),
            Conn::Server(s) => s.flush(),
        }
        .map_err(wrap_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_identities_parse_and_print_alike() {
        for text in [
            "name:host-b.example",
            "spki-sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ] {
            assert_eq!(PeerIdentity::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "host",
            "name:",
            "spki-sha256:00",
            "spki-sha256:zz112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ] {
            assert!(
                matches!(PeerIdentity::parse(bad), Err(TlsError::Config(_))),
                "{bad}"
            );
        }
        assert!(
            PeerIdentity::Name("A.example".into()).matches(&PeerIdentity::Name("a.EXAMPLE".into()))
        );
    }

    #[test]
    fn a_config_needs_a_ca() {
        assert!(matches!(
            TlsConfig::new(b"not pem"),
            Err(TlsError::Config(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(
            matches!(TlsConfig::from_dir(dir.path()), Err(TlsError::Config(m)) if m.contains("ca-cert.pem"))
        );
    }
}
