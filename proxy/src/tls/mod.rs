//! TLS in the data plane (rustls + tokio-rustls, ring provider).
//!
//! - [`config`]: `DownstreamTlsContext` / `UpstreamTlsContext` / SDS `Secret` translation
//!   (protobuf stops there).
//! - [`server`]: a filter chain's [`ServerTls`] (SNI certificate selection, client
//!   certificate verification with SAN matchers, ALPN, versions and ciphers, resumption) and
//!   the handshake producing [`weir_filters::DownstreamTls`] for `ConnInfo.tls`.
//! - [`client`]: a cluster's [`ClientTls`] for upstream connections (SNI, client
//!   certificate, chain + SAN verification, ALPN picking h2).
//! - [`inspector`]: `envoy.filters.listener.tls_inspector` (ClientHello peek: SNI, ALPN).
//! - [`secrets`]: SDS secrets from ADS and files, with rotation for new handshakes.
//! - [`certs`]: PEM and X.509 facts (SANs, subject, serial, SHA-256, admin `/certs`).
//!
//! OWNER: tls helper. See docs/arch-tls.md.

pub mod admin;
pub mod certs;
pub mod client;
pub mod config;
pub mod inspector;
pub mod secrets;
pub mod server;

pub use client::ClientTls;
pub use server::ServerTls;

use metrics::Counter;

use crate::stats::Scope;

/// Envoy's `ssl.*` stats of a listener (`listener.<addr>.ssl.*`) or a cluster
/// (`cluster.<name>.ssl.*`).
#[derive(Debug)]
pub struct SslStats {
    /// `ssl.handshake`: completed handshakes.
    pub handshake: Counter,
    /// `ssl.connection_error`: failed handshakes (any reason).
    pub connection_error: Counter,
    /// `ssl.no_certificate`: handshakes where the peer sent no certificate.
    pub no_certificate: Counter,
    /// `ssl.fail_verify_no_cert`: a required client certificate was missing.
    pub fail_verify_no_cert: Counter,
    /// `ssl.fail_verify_san`: the peer certificate's SANs matched no matcher.
    pub fail_verify_san: Counter,
    /// `ssl.fail_verify_error`: chain verification failed.
    pub fail_verify_error: Counter,
    /// `ssl.session_reused`.
    pub session_reused: Counter,
    versions: Vec<(&'static str, Counter)>,
    ciphers: Vec<(String, Counter)>,
    scope: Scope,
}

impl SslStats {
    /// Register `ssl.*` under `scope` (a listener or cluster scope).
    pub fn new(scope: &Scope) -> Self {
        let ssl = scope.child("ssl");
        let versions = ["TLSv1.2", "TLSv1.3"]
            .into_iter()
            .map(|v| (v, ssl.counter(&format!("versions.{v}"))))
            .collect();
        let ciphers = config::CIPHERS
            .iter()
            .map(|(n, _)| (n.to_string(), ssl.counter(&format!("ciphers.{n}"))))
            .collect();
        Self {
            handshake: ssl.counter("handshake"),
            connection_error: ssl.counter("connection_error"),
            no_certificate: ssl.counter("no_certificate"),
            fail_verify_no_cert: ssl.counter("fail_verify_no_cert"),
            fail_verify_san: ssl.counter("fail_verify_san"),
            fail_verify_error: ssl.counter("fail_verify_error"),
            session_reused: ssl.counter("session_reused"),
            versions,
            ciphers,
            scope: ssl,
        }
    }

    /// `ssl.versions.<v>`.
    pub fn version(&self, v: &str) -> Counter {
        self.versions
            .iter()
            .find(|(n, _)| *n == v)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| self.scope.counter(&format!("versions.{v}")))
    }

    /// `ssl.ciphers.<c>`.
    pub fn cipher(&self, c: &str) -> Counter {
        self.ciphers
            .iter()
            .find(|(n, _)| n == c)
            .map(|(_, ctr)| ctr.clone())
            .unwrap_or_else(|| self.scope.counter(&format!("ciphers.{c}")))
    }
}

/// The SDS secrets a context uses.
fn sds_refs(c: &config::CommonTls) -> impl Iterator<Item = &config::SdsRef> {
    c.certs
        .iter()
        .filter_map(|c| match c {
            config::CertSource::Sds(r) => Some(r),
            config::CertSource::Static(_) => None,
        })
        .chain(c.validation.iter().filter_map(|v| match v {
            config::ValidationSource::Sds { sds, .. } => Some(sds),
            config::ValidationSource::Static(_) => None,
        }))
}

/// Install ring as rustls' process default provider (tonic and tests build configs without
/// naming one). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
