//! Upstream TLS: a cluster's [`ClientTls`] (rustls `ClientConfig` from an
//! [`UpstreamTlsConfig`], rebuilt when an SDS secret it uses changes) and the connect-side
//! handshake.
//!
//! Verification follows Envoy: the chain must lead to `trusted_ca` (always: weir refuses a
//! TLS cluster without a validation context); then, when `match_typed_subject_alt_names` is
//! set, a SAN must match; without matchers the certificate's names are only checked against
//! the SNI when `auto_sni_san_validation` is set (Envoy does not check the SNI otherwise).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use super::SslStats;
use super::config::{SanMatcher, UpstreamTlsConfig};
use super::secrets::SecretRegistry;
use super::server::{BuildError, cert_pair, provider, trusted_ca_certs, validation, versions};

/// Chain to the roots, then SAN matchers (or the SNI with `auto_sni_san_validation`).
#[derive(Debug)]
struct UpstreamVerifier {
    roots: rustls::RootCertStore,
    sans: Vec<SanMatcher>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
    stats: Arc<SslStats>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity).inspect_err(|_| {
            self.stats.fail_verify_error.increment(1);
        })?;
        if let Err(e) = rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        ) {
            self.stats.fail_verify_error.increment(1);
            return Err(e);
        }
        if !self.sans.is_empty() {
            if !super::config::sans_match(&self.sans, &super::certs::sans(end_entity)) {
                self.stats.fail_verify_san.increment(1);
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ));
            }
        } else if self.check_name
            && let Err(e) = rustls::client::verify_server_name(&parsed, server_name)
        {
            self.stats.fail_verify_san.increment(1);
            return Err(e);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct Built {
    generation: u64,
    config: Arc<rustls::ClientConfig>,
    /// The same without `h2` in ALPN (HTTP/1.1 connections of an ALPN-auto cluster).
    h1_config: Arc<rustls::ClientConfig>,
}

/// What ALPN negotiated with this cluster's upstreams (learned from the first connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlpnState {
    /// Not known yet.
    Unknown,
    /// The upstream picked `h2`.
    H2,
    /// The upstream picked something else (or nothing): HTTP/1.1.
    H1,
}

/// A cluster's upstream TLS.
pub struct ClientTls {
    cfg: UpstreamTlsConfig,
    registry: Arc<SecretRegistry>,
    /// Cluster-scoped `ssl.*` stats.
    pub stats: Arc<SslStats>,
    built: ArcSwapOption<Built>,
    /// [`AlpnState`] as 0/1/2.
    alpn: std::sync::atomic::AtomicU8,
    /// Shared across rebuilds: session resumption to the upstream.
    sessions: Arc<dyn rustls::client::ClientSessionStore>,
    /// Keeps this context's ADS secrets subscribed.
    _wants: Vec<Arc<()>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("config", &self.cfg)
            .finish()
    }
}

/// An upstream TLS connection.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

impl ClientTls {
    /// A client context; file SDS secrets start loading now.
    pub fn new(
        cfg: UpstreamTlsConfig,
        registry: Arc<SecretRegistry>,
        stats: Arc<SslStats>,
    ) -> Self {
        let wants = super::sds_refs(&cfg.common)
            .map(|r| registry.want(r))
            .collect();
        Self {
            cfg,
            registry,
            stats,
            built: ArcSwapOption::empty(),
            alpn: std::sync::atomic::AtomicU8::new(0),
            sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(256)),
            _wants: wants,
        }
    }

    /// The config as translated.
    pub fn config(&self) -> &UpstreamTlsConfig {
        &self.cfg
    }

    fn build(&self, generation: u64) -> Result<Built, BuildError> {
        let common = &self.cfg.common;
        let provider = provider(&common.params);
        let v = match &common.validation {
            Some(v) => validation(v, &self.registry)?,
            None => return Err(BuildError::Rustls("no validation context".into())),
        };
        let Some(ca) = &v.trusted_ca else {
            return Err(BuildError::Rustls(
                "the validation context has no trusted_ca".into(),
            ));
        };
        let verifier = Arc::new(UpstreamVerifier {
            roots: super::certs::root_store(ca)?,
            sans: v.sans.clone(),
            check_name: self.cfg.auto_sni_san_validation,
            provider: provider.clone(),
            stats: self.stats.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions(&common.params))
            .map_err(|e| BuildError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match common.certs.first() {
            Some(c) => {
                let pair = cert_pair(c, &self.registry)?;
                // Checks the key matches.
                super::certs::certified_key(&pair)?;
                use rustls::pki_types::pem::PemObject;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pair.key)
                    .map_err(|e| BuildError::Rustls(e.to_string()))?;
                builder
                    .with_client_auth_cert(super::certs::certs(&pair.chain)?, key)
                    .map_err(|e| BuildError::Rustls(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = common.alpn.clone();
        config.resumption = rustls::client::Resumption::store(self.sessions.clone());
        if self.cfg.sni.is_empty() && !self.cfg.auto_host_sni {
            config.enable_sni = false;
        }
        let mut h1 = config.clone();
        h1.alpn_protocols.retain(|a| a != b"h2");
        Ok(Built {
            generation,
            config: Arc::new(config),
            h1_config: Arc::new(h1),
        })
    }

    fn current(&self, h1_only: bool) -> Result<Arc<rustls::ClientConfig>, BuildError> {
        let generation = self.registry.generation();
        let b = match self.built.load_full() {
            Some(b) if b.generation == generation => b,
            _ => {
                let b = Arc::new(self.build(generation)?);
                self.built.store(Some(b.clone()));
                b
            }
        };
        Ok(if h1_only {
            b.h1_config.clone()
        } else {
            b.config.clone()
        })
    }

    /// What ALPN negotiated last.
    /// Whether every SDS secret the context names has arrived (warming; other build
    /// errors count as ready: handshakes fail and are counted).
    pub fn secrets_ready(&self) -> bool {
        !matches!(self.current(false), Err(BuildError::MissingSecret(_)))
    }

    /// ALPN learned so far.
    pub fn alpn_state(&self) -> AlpnState {
        match self.alpn.load(std::sync::atomic::Ordering::Relaxed) {
            2 => AlpnState::H2,
            1 => AlpnState::H1,
            _ => AlpnState::Unknown,
        }
    }

    /// Record what an upstream negotiated.
    pub fn learn_alpn(&self, h2: bool) {
        self.alpn
            .store(if h2 { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
    }

    /// The SNI for a host: `sni`, else the host's name with `auto_host_sni`, else its IP
    /// (sent to rustls for verification only; `enable_sni` is off then).
    fn server_name(&self, host: Option<&str>, ip: std::net::IpAddr) -> ServerName<'static> {
        let name = if !self.cfg.sni.is_empty() {
            Some(self.cfg.sni.as_str())
        } else if self.cfg.auto_host_sni {
            host
        } else {
            None
        };
        name.and_then(|n| ServerName::try_from(n.to_string()).ok())
            .unwrap_or(ServerName::IpAddress(ip.into()))
    }

    /// Handshake on a connected stream. The negotiated ALPN is `stream.get_ref().1.alpn_protocol()`.
    /// `h1_only` leaves `h2` out of the offered ALPN.
    pub async fn connect(
        &self,
        stream: TcpStream,
        host: Option<&str>,
        ip: std::net::IpAddr,
        h1_only: bool,
    ) -> std::io::Result<ClientStream> {
        let config = self.current(h1_only).map_err(|e| {
            self.stats.connection_error.increment(1);
            std::io::Error::other(e.to_string())
        })?;
        let connector = tokio_rustls::TlsConnector::from(config);
        match connector.connect(self.server_name(host, ip), stream).await {
            Ok(s) => {
                let (_, c) = s.get_ref();
                self.stats.handshake.increment(1);
                if let Some(v) = c.protocol_version() {
                    self.stats
                        .version(if v == rustls::ProtocolVersion::TLSv1_3 {
                            "TLSv1.3"
                        } else {
                            "TLSv1.2"
                        })
                        .increment(1);
                }
                if let Some(cs) = c.negotiated_cipher_suite() {
                    self.stats
                        .cipher(&super::config::cipher_name(cs.suite()))
                        .increment(1);
                }
                if c.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    self.stats.session_reused.increment(1);
                }
                Ok(s)
            }
            Err(e) => {
                self.stats.connection_error.increment(1);
                Err(e)
            }
        }
    }

    /// The client certificate chain and the trusted CAs (admin `/certs`).
    pub fn certificates(&self) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
        let chain = self
            .cfg
            .common
            .certs
            .first()
            .and_then(|c| cert_pair(c, &self.registry).ok())
            .and_then(|p| super::certs::certs(&p.chain).ok())
            .unwrap_or_default();
        (chain, trusted_ca_certs(&self.cfg.common, &self.registry))
    }

    /// Whether the config offers `h2` by ALPN.
    pub fn offers_h2(&self) -> bool {
        self.cfg.common.alpn.iter().any(|a| a == b"h2")
    }
}
