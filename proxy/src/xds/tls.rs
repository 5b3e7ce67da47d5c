//! TLS for the ADS stream, derived from the ADS cluster's general upstream TLS config
//! ([`crate::tls::config::UpstreamTlsConfig`]; the cluster is a normal cluster, usable by
//! routes too). tonic drives the gRPC stream, so its TLS settings are taken from that config:
//! `sni` (the name the server certificate is verified against; empty = the endpoint's
//! address), `trusted_ca`, and one client certificate. The ADS stream cannot use SDS for its
//! own certificates (it would wait for itself): SDS sources there are rejected.

use crate::config::Errors;
use crate::tls::config::{CertSource, UpstreamTlsConfig, ValidationSource};

/// TLS settings of the ADS stream.
#[derive(Clone, PartialEq, Eq)]
pub struct AdsTls {
    /// `sni` (also the name the server certificate is verified against); empty = the
    /// endpoint's address.
    pub sni: String,
    /// PEM of the CAs the server certificate must chain to (`trusted_ca`).
    pub ca_pem: Vec<u8>,
    /// Client certificate chain and key PEM (`tls_certificates[0]`), for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for AdsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("AdsTls")
            .field("sni", &self.sni)
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// The ADS stream's TLS from its cluster's `transport_socket` (at `path`, for errors).
pub fn from_cluster(t: &UpstreamTlsConfig, path: &str, errs: &mut Errors) -> Option<AdsTls> {
    let cpath = format!("{path}.typed_config.common_tls_context");
    let identity = match t.common.certs.first() {
        None => None,
        Some(CertSource::Static(p)) => Some((p.chain.clone(), p.key.clone())),
        Some(CertSource::Sds(_)) => {
            errs.add(
                format!("{cpath}.tls_certificate_sds_secret_configs"),
                "the ADS cluster cannot take its certificate from SDS; use tls_certificates",
            );
            return None;
        }
    };
    let ca_pem = match &t.common.validation {
        Some(ValidationSource::Static(v)) => v.trusted_ca.clone(),
        Some(ValidationSource::Sds { .. }) => {
            errs.add(
                format!("{cpath}.validation_context_sds_secret_config"),
                "the ADS cluster cannot take its trusted CA from SDS; use validation_context",
            );
            return None;
        }
        None => None,
    };
    let Some(ca_pem) = ca_pem else {
        errs.add(
            format!("{cpath}.validation_context.trusted_ca"),
            "the ADS cluster needs trusted_ca (the server certificate is always verified)",
        );
        return None;
    };
    Some(AdsTls {
        sni: t.sni.clone(),
        ca_pem,
        identity,
    })
}
