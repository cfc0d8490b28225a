//! Throwaway certificates for TLS tests and demos: a CA, server and client
//! certificates signed by it, and the bad ones (expired, not yet valid, from another
//! CA, for another name), made at run time with rcgen.
//!
//! ```
//! use migration_testkit::test_pki::{TestCa, Validity};
//!
//! let ca = TestCa::new("test CA").unwrap();
//! let server = ca.server(&["localhost", "127.0.0.1"], Validity::Valid).unwrap();
//! let client = ca.client("host-a", Validity::Valid).unwrap();
//! let listen = ca.config().unwrap().with_server_identity(server.cert_pem.as_bytes(), server.key_pem.as_bytes()).unwrap();
//! let connect = ca.config().unwrap().with_client_identity(client.cert_pem.as_bytes(), client.key_pem.as_bytes()).unwrap();
//! # let _ = (listen, connect);
//! ```

use std::path::Path;

use migration_core::tls::{TlsConfig, TlsError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Errors of making or writing test certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestPkiError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The certificates do not load as a TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing a PEM file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From 2020 to 2090.
    Valid,
    /// From 2000 to 2001.
    Expired,
    /// From 2090 to 2099.
    NotYetValid,
}

impl Validity {
    fn apply(self, p: &mut CertificateParams) {
        let (from, to) = match self {
            Validity::Valid => (2020, 2090),
            Validity::Expired => (2000, 2001),
            Validity::NotYetValid => (2090, 2099),
        };
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
}

/// A certificate and its private key, in PEM.
#[derive(Clone, Debug)]
pub struct TestCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// The certificate in DER.
    pub der: Vec<u8>,
}

/// A throwaway certificate authority.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA (ECDSA P-256) with the common name `name`.
    pub fn new(name: &str) -> Result<Self, TestPkiError> {
        let mut p = CertificateParams::new(Vec::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Validity::Valid.apply(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A [`TlsConfig`] that trusts this CA, with no identity yet.
    pub fn config(&self) -> Result<TlsConfig, TestPkiError> {
        Ok(TlsConfig::new(self.pem().as_bytes())?)
    }

    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> Result<TestCert, TestPkiError> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut p = CertificateParams::new(names)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        validity.apply(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses; the first is also
    /// the common name).
    pub fn server(&self, names: &[&str], validity: Validity) -> Result<TestCert, TestPkiError> {
        let cn = names.first().copied().unwrap_or("server");
        self.issue(cn, names, ExtendedKeyUsagePurpose::ServerAuth, validity)
    }

    /// A client certificate with the common name and DNS name `name`.
    pub fn client(&self, name: &str, validity: Validity) -> Result<TestCert, TestPkiError> {
        self.issue(name, &[name], ExtendedKeyUsagePurpose::ClientAuth, validity)
    }
}

/// A CA with a server certificate (`localhost`, `127.0.0.1`, `::1`) and a client
/// certificate (`source.test`): the usual pair for a test or the demo.
#[derive(Debug)]
pub struct TestPki {
    /// The CA.
    pub ca: TestCa,
    /// The listening side's certificate.
    pub server: TestCert,
    /// The connecting side's certificate.
    pub client: TestCert,
}

/// The client certificate's name in [`TestPki::new`].
pub const TEST_CLIENT_NAME: &str = "source.test";

impl TestPki {
    /// A fresh CA and a valid server and client certificate.
    pub fn new() -> Result<Self, TestPkiError> {
        Self::for_server(&["localhost", "127.0.0.1", "::1"])
    }

    /// A fresh CA, a server certificate for `names` (DNS names, IP addresses) and a
    /// client certificate.
    pub fn for_server(names: &[&str]) -> Result<Self, TestPkiError> {
        let ca = TestCa::new("vm-migration test CA")?;
        let server = ca.server(names, Validity::Valid)?;
        let client = ca.client(TEST_CLIENT_NAME, Validity::Valid)?;
        Ok(Self { ca, server, client })
    }

    /// The listening side's configuration: this CA, the server certificate.
    pub fn server_config(&self) -> Result<TlsConfig, TestPkiError> {
        Ok(self.ca.config()?.with_server_identity(
            self.server.cert_pem.as_bytes(),
            self.server.key_pem.as_bytes(),
        )?)
    }

    /// The connecting side's configuration: this CA, the client certificate.
    pub fn client_config(&self) -> Result<TlsConfig, TestPkiError> {
        Ok(self.ca.config()?.with_client_identity(
            self.client.cert_pem.as_bytes(),
            self.client.key_pem.as_bytes(),
        )?)
    }

    /// Writes the Cloud Hypervisor layout into `dir`: `ca-cert.pem`, `server-cert.pem`,
    /// `server-key.pem`, `client-cert.pem`, `client-key.pem` (keys mode 0600).
    pub fn write_dir(&self, dir: &Path) -> Result<(), TestPkiError> {
        use std::os::unix::fs::OpenOptionsExt;
        for (name, text, mode) in [
            ("ca-cert.pem", self.ca.pem(), 0o644),
            ("server-cert.pem", self.server.cert_pem.clone(), 0o644),
            ("server-key.pem", self.server.key_pem.clone(), 0o600),
            ("client-cert.pem", self.client.cert_pem.clone(), 0o644),
            ("client-key.pem", self.client.key_pem.clone(), 0o600),
        ] {
            let path = dir.join(name);
            let err = |source| TestPkiError::Write {
                path: path.display().to_string(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(err)?;
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)?;
        }
        Ok(())
    }
}
