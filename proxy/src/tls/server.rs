//! Downstream TLS: a filter chain's [`ServerTls`] (rustls `ServerConfig` built from a
//! [`DownstreamTlsConfig`], rebuilt when an SDS secret it uses changes) and the handshake.
//!
//! Certificate selection ([`SniResolver`]): the first certificate whose SANs (DNS, with
//! `*.` wildcards) cover the client's SNI, else the first certificate (Envoy's order).
//! Client certificates ([`SanVerifier`]): rustls' WebPKI verifier (chain to `trusted_ca`,
//! CRLs) and then `match_typed_subject_alt_names`; failures are counted as
//! `ssl.fail_verify_error` / `ssl.fail_verify_san`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::DistinguishedName;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use tokio::net::TcpStream;
use weir_filters::DownstreamTls;

use super::SslStats;
use super::config::{
    CertPair, CertSource, DownstreamTlsConfig, SanMatcher, SecretValue, TlsParams, TlsVersion,
    Validation, ValidationSource,
};
use super::secrets::SecretRegistry;

/// Why a TLS context cannot be built now.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An SDS secret has not arrived (the context is warming).
    #[error("SDS secret {0:?} is not available yet")]
    MissingSecret(String),
    /// An SDS secret of the wrong kind.
    #[error("SDS secret {0:?} is not a {1}")]
    WrongSecret(String, &'static str),
    /// Certificate material.
    #[error(transparent)]
    Cert(#[from] super::certs::CertError),
    /// rustls refused the settings.
    #[error("{0}")]
    Rustls(String),
}

/// One certificate the server can present.
#[derive(Debug)]
struct ServedCert {
    /// DNS SANs (lower-case) it covers.
    names: Vec<String>,
    /// URI SANs (for `DownstreamTls.local_uri_sans`).
    uri_sans: Vec<String>,
    key: Arc<rustls::sign::CertifiedKey>,
}

/// SNI -> certificate (Envoy's selection; falls back to the first).
#[derive(Debug)]
pub struct SniResolver {
    certs: Vec<ServedCert>,
}

fn covers(name: &str, sni: &str) -> bool {
    if name.eq_ignore_ascii_case(sni) {
        return true;
    }
    match (name.strip_prefix("*."), sni.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Option<&ServedCert> {
        sni.and_then(|s| {
            // Exact names beat wildcards.
            self.certs
                .iter()
                .find(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(s)))
                .or_else(|| {
                    self.certs
                        .iter()
                        .find(|c| c.names.iter().any(|n| covers(n, s)))
                })
        })
        .or_else(|| self.certs.first())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.pick(hello.server_name()).map(|c| c.key.clone())
    }
}

/// WebPKI client verification plus SAN matchers, counting failures.
#[derive(Debug)]
pub struct SanVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    sans: Vec<SanMatcher>,
    stats: Arc<SslStats>,
}

impl ClientCertVerifier for SanVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
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
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.stats.fail_verify_error.increment(1);
            return Err(e);
        }
        if !super::config::sans_match(&self.sans, &super::certs::sans(end_entity)) {
            self.stats.fail_verify_san.increment(1);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls provider restricted to `params.cipher_suites`.
pub(super) fn provider(params: &TlsParams) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if let Some(want) = &params.cipher_suites {
        p.cipher_suites.retain(|s| want.contains(&s.suite()));
    }
    Arc::new(p)
}

/// The protocol versions `params` allow (default 1.2..=1.3).
pub(super) fn versions(params: &TlsParams) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let min = params.min.unwrap_or(TlsVersion::V12);
    let max = params.max.unwrap_or(TlsVersion::V13);
    let mut v = Vec::new();
    if min <= TlsVersion::V13 && max >= TlsVersion::V13 {
        v.push(&rustls::version::TLS13);
    }
    if min <= TlsVersion::V12 && max >= TlsVersion::V12 {
        v.push(&rustls::version::TLS12);
    }
    v
}

/// Resolve a certificate source to its PEM pair.
pub(super) fn cert_pair(
    src: &CertSource,
    reg: &SecretRegistry,
) -> Result<Arc<CertPair>, BuildError> {
    match src {
        CertSource::Static(p) => Ok(Arc::new(p.clone())),
        CertSource::Sds(r) => match reg.get(&r.key()).as_deref() {
            Some(SecretValue::Certificate(p)) => Ok(Arc::new(p.clone())),
            Some(_) => Err(BuildError::WrongSecret(r.name.clone(), "tls_certificate")),
            None => Err(BuildError::MissingSecret(r.name.clone())),
        },
    }
}

/// The trusted CA certificates a context validates peers with, as `/certs` shows them (empty
/// when there is no validation context or its secret has not arrived).
pub(super) fn trusted_ca_certs(
    common: &super::config::CommonTls,
    reg: &SecretRegistry,
) -> Vec<CertificateDer<'static>> {
    common
        .validation
        .as_ref()
        .and_then(|v| validation(v, reg).ok())
        .and_then(|v| v.trusted_ca)
        .and_then(|p| super::certs::certs(&p).ok())
        .unwrap_or_default()
}

/// Resolve a validation source (SDS values merged with the combined default's SAN matchers).
pub(super) fn validation(
    src: &ValidationSource,
    reg: &SecretRegistry,
) -> Result<Validation, BuildError> {
    match src {
        ValidationSource::Static(v) => Ok(v.clone()),
        ValidationSource::Sds { sds, default } => match reg.get(&sds.key()).as_deref() {
            Some(SecretValue::Validation(v)) => {
                let mut v = v.clone();
                if !default.sans.is_empty() {
                    v.sans = default.sans.clone();
                }
                if v.trusted_ca.is_none() {
                    v.trusted_ca = default.trusted_ca.clone();
                }
                if v.crl.is_none() {
                    v.crl = default.crl.clone();
                }
                Ok(v)
            }
            Some(_) => Err(BuildError::WrongSecret(
                sds.name.clone(),
                "validation_context",
            )),
            None => Err(BuildError::MissingSecret(sds.name.clone())),
        },
    }
}

/// What a built server config knows besides the rustls config.
struct Built {
    generation: u64,
    config: Arc<rustls::ServerConfig>,
    resolver: Arc<SniResolver>,
}

/// A filter chain's downstream TLS.
pub struct ServerTls {
    cfg: DownstreamTlsConfig,
    registry: Arc<SecretRegistry>,
    /// Listener-scoped `ssl.*` stats.
    pub stats: Arc<SslStats>,
    /// `transport_socket_connect_timeout` (handshake timeout).
    pub handshake_timeout: Duration,
    built: ArcSwapOption<Built>,
    /// Shared across rebuilds so resumption survives a certificate rotation.
    session_cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// Keeps this context's ADS secrets subscribed.
    _wants: Vec<Arc<()>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("config", &self.cfg)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// A failed handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The config could not be built (missing SDS secret, ...).
    #[error("TLS context unavailable: {0}")]
    Config(#[from] BuildError),
    /// The handshake timed out.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The handshake failed.
    #[error("TLS handshake failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ServerTls {
    /// A server context; file SDS secrets start loading now.
    pub fn new(
        cfg: DownstreamTlsConfig,
        registry: Arc<SecretRegistry>,
        stats: Arc<SslStats>,
        handshake_timeout: Duration,
    ) -> Self {
        let wants = super::sds_refs(&cfg.common)
            .map(|r| registry.want(r))
            .collect();
        let session_cache: Arc<dyn rustls::server::StoresServerSessions> = if cfg.session_cache {
            rustls::server::ServerSessionMemoryCache::new(1024)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        let ticketer = if cfg.session_tickets {
            match rustls::crypto::ring::Ticketer::new() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "no TLS session tickets");
                    None
                }
            }
        } else {
            None
        };
        Self {
            cfg,
            registry,
            stats,
            handshake_timeout,
            built: ArcSwapOption::empty(),
            session_cache,
            ticketer,
            _wants: wants,
        }
    }

    /// The config as translated.
    pub fn config(&self) -> &DownstreamTlsConfig {
        &self.cfg
    }

    fn build(&self, generation: u64) -> Result<Built, BuildError> {
        let common = &self.cfg.common;
        let mut certs = Vec::with_capacity(common.certs.len());
        for c in &common.certs {
            let pair = cert_pair(c, &self.registry)?;
            let key = super::certs::certified_key(&pair)?;
            let sans = key
                .end_entity_cert()
                .map(|d| super::certs::sans(d))
                .unwrap_or_default();
            certs.push(ServedCert {
                names: sans.dns.iter().map(|n| n.to_ascii_lowercase()).collect(),
                uri_sans: sans.uri,
                key: Arc::new(key),
            });
        }
        let resolver = Arc::new(SniResolver { certs });
        let provider = provider(&common.params);
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions(&common.params))
            .map_err(|e| BuildError::Rustls(e.to_string()))?;
        let verifier: Arc<dyn ClientCertVerifier> = match &common.validation {
            None => rustls::server::WebPkiClientVerifier::no_client_auth(),
            Some(v) => {
                let v = validation(v, &self.registry)?;
                match &v.trusted_ca {
                    None => rustls::server::WebPkiClientVerifier::no_client_auth(),
                    Some(ca) => {
                        let roots = Arc::new(super::certs::root_store(ca)?);
                        let mut b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                            roots, provider,
                        );
                        if let Some(crl) = &v.crl {
                            b = b.with_crls(super::certs::crls(crl)?);
                        }
                        if !self.cfg.require_client_certificate {
                            b = b.allow_unauthenticated();
                        }
                        let inner = b.build().map_err(|e| BuildError::Rustls(e.to_string()))?;
                        Arc::new(SanVerifier {
                            inner,
                            sans: v.sans,
                            stats: self.stats.clone(),
                        })
                    }
                }
            }
        };
        let mut config = builder
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = common.alpn.clone();
        config.session_storage = self.session_cache.clone();
        if let Some(t) = &self.ticketer {
            config.ticketer = t.clone();
        } else {
            config.send_tls13_tickets = 0;
        }
        Ok(Built {
            generation,
            config: Arc::new(config),
            resolver,
        })
    }

    /// The current rustls config, rebuilt when a secret changed since it was built.
    fn current(&self) -> Result<Arc<Built>, BuildError> {
        let generation = self.registry.generation();
        if let Some(b) = self.built.load_full()
            && b.generation == generation
        {
            return Ok(b);
        }
        let b = Arc::new(self.build(generation)?);
        self.built.store(Some(b.clone()));
        Ok(b)
    }

    /// Check the context can be built now (static config errors surface at load time).
    pub fn ready(&self) -> Result<(), BuildError> {
        self.current().map(|_| ())
    }

    /// Whether every SDS secret the context names has arrived (warming; other build
    /// errors count as ready: handshakes fail and are counted).
    pub fn secrets_ready(&self) -> bool {
        !matches!(self.current(), Err(BuildError::MissingSecret(_)))
    }

    /// Terminate TLS on `stream` within the handshake timeout; counts `ssl.*` stats.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, DownstreamTls), HandshakeError> {
        let built = match self.current() {
            Ok(b) => b,
            Err(e) => {
                self.stats.connection_error.increment(1);
                return Err(e.into());
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(built.config.clone());
        let tls = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await
        {
            Err(_) => {
                self.stats.connection_error.increment(1);
                return Err(HandshakeError::Timeout);
            }
            Ok(Err(e)) => {
                let no_cert = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::NoCertificatesPresented));
                if no_cert {
                    self.stats.fail_verify_no_cert.increment(1);
                }
                self.stats.connection_error.increment(1);
                return Err(e.into());
            }
            Ok(Ok(s)) => s,
        };
        let (_, conn) = tls.get_ref();
        let info = self.facts(conn, &built.resolver);
        Ok((tls, info))
    }

    fn facts(&self, conn: &rustls::ServerConnection, resolver: &SniResolver) -> DownstreamTls {
        self.stats.handshake.increment(1);
        let sni = conn.server_name().map(str::to_string);
        let version = conn.protocol_version().map(|v| match v {
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
            _ => "TLSv1.2",
        });
        if let Some(v) = version {
            self.stats.version(v).increment(1);
        }
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| super::config::cipher_name(s.suite()));
        if let Some(c) = &cipher {
            self.stats.cipher(c).increment(1);
        }
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.stats.session_reused.increment(1);
        }
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|d| super::certs::peer_cert(d));
        if peer.is_none() {
            self.stats.no_certificate.increment(1);
        }
        let local_uri_sans = resolver
            .pick(sni.as_deref())
            .map(|c| c.uri_sans.clone())
            .unwrap_or_default();
        DownstreamTls {
            sni,
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            terminated: true,
            version,
            cipher,
            local_uri_sans,
            peer,
        }
    }

    /// The certificates this context serves now and its CA (admin `/certs`).
    pub fn certificates(&self) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
        let Ok(b) = self.current() else {
            return (Vec::new(), Vec::new());
        };
        let chain = b
            .resolver
            .certs
            .iter()
            .flat_map(|c| c.key.cert.first().cloned())
            .collect();
        (chain, trusted_ca_certs(&self.cfg.common, &self.registry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_cover() {
        assert!(covers("*.example.com", "a.example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("A.example.com", "a.EXAMPLE.com"));
    }

    #[test]
    fn versions_follow_params() {
        let p = |min, max| TlsParams {
            min,
            max,
            cipher_suites: None,
        };
        assert_eq!(versions(&p(None, None)).len(), 2);
        assert_eq!(
            versions(&p(Some(TlsVersion::V13), None)),
            vec![&rustls::version::TLS13]
        );
        assert_eq!(
            versions(&p(None, Some(TlsVersion::V12))),
            vec![&rustls::version::TLS12]
        );
    }
}
