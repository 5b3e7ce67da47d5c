//! Admin `/certs` (Envoy's `Certificates` JSON: per TLS context, `ca_cert` and `cert_chain`
//! with serial number, SANs, days until expiration, validity) and the secrets of
//! `/config_dump` (names and kinds, never key material).

use serde_json::{Value, json};

use crate::server::ServerState;

/// `GET /certs`.
pub fn certs(state: &ServerState) -> Value {
    let mut out = Vec::new();
    let mut push = |ca: Vec<rustls::pki_types::CertificateDer<'static>>,
                    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
                    origin: String| {
        out.push(json!({
            "ca_cert": ca.iter().map(|c| super::certs::details_json(c, &origin)).collect::<Vec<_>>(),
            "cert_chain": chain.iter().map(|c| super::certs::details_json(c, &origin)).collect::<Vec<_>>(),
        }));
    };
    for l in state.listener_manager.listeners() {
        let Some(cfg) = state.listener_manager.config(&l.name) else {
            continue;
        };
        for c in cfg
            .filter_chains
            .iter()
            .chain(cfg.default_filter_chain.iter())
        {
            if let Some(t) = &c.tls {
                let (chain, ca) = t.certificates();
                push(ca, chain, format!("listener {} chain {:?}", l.name, c.name));
            }
        }
    }
    for c in state.clusters.all() {
        if let Some(t) = &c.tls {
            let (chain, ca) = t.certificates();
            push(ca, chain, format!("cluster {}", c.name()));
        }
    }
    json!({ "certificates": out })
}

/// `/config_dump` secrets: `dynamic_active_secrets` (name, kind, version).
pub fn secrets_dump(store: &std::sync::Arc<crate::stats::Store>) -> Value {
    let reg = super::secrets::registry(store);
    let list: Vec<Value> = reg
        .all()
        .into_iter()
        .map(|(k, v)| {
            let (name, source) = match k.strip_prefix("file:").and_then(|r| r.rsplit_once('#')) {
                Some((path, name)) => (name.to_string(), format!("file {path}")),
                None => (k.clone(), "ads".to_string()),
            };
            let kind = match &*v {
                super::config::SecretValue::Certificate(_) => "tls_certificate",
                super::config::SecretValue::Validation(_) => "validation_context",
            };
            json!({ "name": name, "source": source, "kind": kind })
        })
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        "dynamic_active_secrets": list,
    })
}
