//! TLS for the ADS stream: the ADS cluster's `transport_socket`
//! (`envoy.transport_sockets.tls` with an `UpstreamTlsContext`).
//!
//! Until upstream TLS lands for data-plane clusters (the TLS issue), a TLS `transport_socket`
//! is accepted only on the cluster that `ads_config` names, and that cluster then serves only
//! the xDS stream: routes and tcp_proxy cannot pick it (it is hidden from
//! [`crate::upstream::ClusterManager::get`]), so no data-plane traffic goes out in plaintext
//! to a cluster configured for TLS. Supported: `sni`, `common_tls_context.tls_certificates`
//! (one client certificate and key), `common_tls_context.validation_context.trusted_ca`, each a
//! `filename`, `inline_string` or `inline_bytes` (files are read when the config loads).

use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3 as tls;

use crate::config::{Errors, join};

/// `type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext`.
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// TLS settings of the ADS stream.
#[derive(Clone, PartialEq, Eq)]
pub struct AdsTls {
    /// `sni` (also the name the server certificate is verified against); empty = the
    /// endpoint's address.
    pub sni: String,
    /// PEM of the CAs the server certificate must chain to (`trusted_ca`); `None` = the
    /// platform's roots are not loaded, so `trusted_ca` is required.
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

fn data_source(ds: Option<&core::DataSource>, path: &str, errs: &mut Errors) -> Option<Vec<u8>> {
    use core::data_source::Specifier;
    let Some(ds) = ds else {
        errs.add(path, "required");
        return None;
    };
    errs.reject_unsupported(ds, &["filename", "inline_string", "inline_bytes"], path);
    match &ds.specifier {
        Some(Specifier::Filename(f)) => match std::fs::read(f) {
            Ok(b) => Some(b),
            Err(e) => {
                errs.add(join(path, "filename"), format!("reading {f}: {e}"));
                None
            }
        },
        Some(Specifier::InlineString(s)) => Some(s.clone().into_bytes()),
        Some(Specifier::InlineBytes(b)) => Some(b.clone()),
        _ => {
            errs.add(path, "filename, inline_string or inline_bytes is required");
            None
        }
    }
}

/// Translate the ADS cluster's `transport_socket` at `path`.
pub fn translate(ts: &core::TransportSocket, path: &str, errs: &mut Errors) -> Option<AdsTls> {
    errs.reject_unsupported(ts, &["name", "typed_config"], path);
    let Some(core::transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        errs.add(
            join(path, "typed_config"),
            "an UpstreamTlsContext is required",
        );
        return None;
    };
    if any.type_url != UPSTREAM_TLS {
        errs.add(
            join(path, "typed_config"),
            format!("only {UPSTREAM_TLS} is supported on the ADS cluster"),
        );
        return None;
    }
    let ctx: tls::UpstreamTlsContext = match weir_xds_api::unpack(any) {
        Ok(c) => c,
        Err(e) => {
            errs.add(join(path, "typed_config"), e.to_string());
            return None;
        }
    };
    let tpath = join(path, "typed_config");
    errs.reject_unsupported(&ctx, &["sni", "common_tls_context"], &tpath);
    let cpath = join(&tpath, "common_tls_context");
    let Some(common) = &ctx.common_tls_context else {
        errs.add(
            cpath,
            "common_tls_context.validation_context.trusted_ca is required",
        );
        return None;
    };
    errs.reject_unsupported(
        common,
        &["tls_certificates", "validation_context", "alpn_protocols"],
        &cpath,
    );
    let identity = match common.tls_certificates.as_slice() {
        [] => None,
        [c] => {
            let p = format!("{cpath}.tls_certificates[0]");
            errs.reject_unsupported(c, &["certificate_chain", "private_key"], &p);
            let chain = data_source(
                c.certificate_chain.as_ref(),
                &join(&p, "certificate_chain"),
                errs,
            );
            let key = data_source(c.private_key.as_ref(), &join(&p, "private_key"), errs);
            chain.zip(key)
        }
        _ => {
            errs.add(
                join(&cpath, "tls_certificates"),
                "at most one client certificate is supported",
            );
            None
        }
    };
    use tls::common_tls_context::ValidationContextType;
    let vpath = join(&cpath, "validation_context");
    let ca_pem = match &common.validation_context_type {
        Some(ValidationContextType::ValidationContext(v)) => {
            errs.reject_unsupported(v, &["trusted_ca"], &vpath);
            data_source(v.trusted_ca.as_ref(), &join(&vpath, "trusted_ca"), errs)
        }
        _ => {
            errs.add(
                vpath,
                "validation_context.trusted_ca is required (the server certificate is always verified)",
            );
            None
        }
    }?;
    Some(AdsTls {
        sni: ctx.sni.clone(),
        ca_pem,
        identity,
    })
}
