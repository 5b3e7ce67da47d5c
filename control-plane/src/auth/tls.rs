//! TLS: the server side (`auth.tls`) for tonic's gRPC server and for the HTTP API
//! (tokio-rustls), the client side for the CLI, and SAN extraction from client certificates.
//!
//! With `client_ca_file`, client certificates are *requested* and, when sent, must chain to
//! that CA (rustls' WebPKI verifier); they stay optional so token clients can connect over
//! TLS too. Both servers use the ring crypto provider.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::AuthConfigError;
use crate::settings::TlsSettings;

fn read(path: &Path, what: &str) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path)
        .map_err(|e| AuthConfigError::Tls(format!("reading {what} {}: {e}", path.display())))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, AuthConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AuthConfigError::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(AuthConfigError::Tls(format!("{what}: no PEM certificate")));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, AuthConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| AuthConfigError::Tls(format!("{what}: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &[u8], what: &str) -> Result<rustls::RootCertStore, AuthConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pem, what)? {
        roots
            .add(c)
            .map_err(|e| AuthConfigError::Tls(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

/// The loaded `auth.tls` files.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Read and check the files (the rustls config is built once here, so bad files fail
    /// at startup).
    pub fn load(s: &TlsSettings) -> Result<Self, AuthConfigError> {
        let t = ServerTls {
            cert_pem: read(&s.cert_file, "cert_file")?,
            key_pem: read(&s.key_file, "key_file")?,
            client_ca_pem: s
                .client_ca_file
                .as_deref()
                .map(|p| read(p, "client_ca_file"))
                .transpose()?,
        };
        t.rustls_config(Vec::new())?;
        Ok(t)
    }

    /// For tonic's gRPC server (h2 ALPN is tonic's).
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem),
        );
        if let Some(ca) = &self.client_ca_pem {
            c = c
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        c
    }

    /// A rustls server config offering `alpn`.
    pub fn rustls_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<rustls::ServerConfig>, AuthConfigError> {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| AuthConfigError::Tls(e.to_string()))?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, "client_ca_file")?),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| AuthConfigError::Tls(format!("client_ca_file: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                certs(&self.cert_pem, "cert_file")?,
                key(&self.key_pem, "key_file")?,
            )
            .map_err(|e| AuthConfigError::Tls(format!("cert_file/key_file: {e}")))?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    }

    /// The acceptor for the HTTP/1.1 API.
    pub fn http_acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, AuthConfigError> {
        Ok(tokio_rustls::TlsAcceptor::from(
            self.rustls_config(vec![b"http/1.1".to_vec()])?,
        ))
    }
}

/// A rustls client config trusting `ca_pem`, presenting `identity` (cert and key PEM) if given.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, AuthConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AuthConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_pem, "--ca-file")?);
    let mut config = match identity {
        Some((cert, k)) => builder
            .with_client_auth_cert(certs(cert, "--cert-file")?, key(k, "--key-file")?)
            .map_err(|e| AuthConfigError::Tls(format!("--cert-file/--key-file: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The URI and DNS subject alternative names of a DER certificate.
pub fn subject_alt_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect())
}
