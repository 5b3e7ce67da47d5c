//! Translation of `envoy.transport_sockets.tls` (`DownstreamTlsContext`,
//! `UpstreamTlsContext`) and SDS `Secret`s into plain, comparable config. Protobuf stops here;
//! rustls objects are built from this by [`super::server`] and [`super::client`].
//!
//! File data sources are read when the config is translated (as Envoy does); certificates
//! that rotate come from SDS (a file `path_config_source` or ADS), see [`super::secrets`].

use std::path::PathBuf;

use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3 as pb;

use crate::config::source::{ConfigSource, SourceKind};
use crate::config::{Errors, join};

/// `type.googleapis.com/...DownstreamTlsContext`.
pub const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// `type.googleapis.com/...UpstreamTlsContext`.
pub const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The TLS transport socket's name.
pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
/// The plain-text transport socket's name (accepted and ignored).
pub const RAW_SOCKET: &str = "envoy.transport_sockets.raw_buffer";

/// A certificate chain and its private key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// Certificate chain, PEM, leaf first.
    pub chain: Vec<u8>,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CertPair")
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

/// Where an SDS secret comes from: ADS (by name) or a file (path + name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SdsRef {
    /// The secret's `name`.
    pub name: String,
    /// `sds_config`; `Ads` = the bootstrap's ADS stream.
    pub source: SourceKind,
}

impl SdsRef {
    /// Key in the [`super::secrets::SecretRegistry`]: the name for ADS, `file:<path>#<name>`
    /// for file sources (two files may both define `default`).
    pub fn key(&self) -> String {
        match &self.source {
            SourceKind::Ads => self.name.clone(),
            SourceKind::Path { path, .. } => format!("file:{}#{}", path.display(), self.name),
        }
    }
}

/// A certificate: inline/file, or by SDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// `tls_certificates[]`.
    Static(CertPair),
    /// `tls_certificate_sds_secret_configs[]`.
    Sds(SdsRef),
}

/// How a SAN is matched (`match_typed_subject_alt_names[].san_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    /// `DNS`.
    Dns,
    /// `URI` (SPIFFE IDs).
    Uri,
    /// `EMAIL`.
    Email,
    /// `IP_ADDRESS` (matched against the textual address).
    Ip,
}

/// Envoy's `StringMatcher` for SANs (the shared compiled matcher).
pub use weir_filters::matcher::StringMatch as StrMatch;

/// One `match_typed_subject_alt_names` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SanMatcher {
    /// Which SANs it looks at.
    pub san_type: SanType,
    /// The matcher.
    pub matcher: StrMatch,
}

/// A certificate's SANs, as the matchers see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sans {
    /// DNS names.
    pub dns: Vec<String>,
    /// URIs.
    pub uri: Vec<String>,
    /// e-mail addresses.
    pub email: Vec<String>,
    /// IP addresses, textual.
    pub ip: Vec<String>,
}

/// Envoy's rule: the certificate is accepted when ANY matcher matches ANY SAN of its type
/// (an empty matcher list accepts everything). DNS matchers with an `exact` value also accept
/// a wildcard SAN covering it (`*.example.com` for `a.example.com`).
pub fn sans_match(matchers: &[SanMatcher], sans: &Sans) -> bool {
    if matchers.is_empty() {
        return true;
    }
    matchers.iter().any(|m| {
        let list = match m.san_type {
            SanType::Dns => &sans.dns,
            SanType::Uri => &sans.uri,
            SanType::Email => &sans.email,
            SanType::Ip => &sans.ip,
        };
        list.iter().any(|s| {
            m.matcher.matches(s)
                || (m.san_type == SanType::Dns
                    && matches!(&m.matcher, StrMatch::Exact(want, _) if dns_wildcard(s, want)))
        })
    })
}

/// `*.example.com` covers exactly one label in front of `example.com`.
fn dns_wildcard(san: &str, name: &str) -> bool {
    let Some(suffix) = san.strip_prefix("*.") else {
        return false;
    };
    match name.split_once('.') {
        Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
        None => false,
    }
}

/// `CertificateValidationContext`, the supported part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validation {
    /// `trusted_ca` PEM (`None`: no chain verification configured).
    pub trusted_ca: Option<Vec<u8>>,
    /// `crl` PEM.
    pub crl: Option<Vec<u8>>,
    /// `match_typed_subject_alt_names`.
    pub sans: Vec<SanMatcher>,
}

/// Where the validation context comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidationSource {
    /// `validation_context`.
    Static(Validation),
    /// `validation_context_sds_secret_config`, or `combined_validation_context` (whose
    /// `default_validation_context` is merged over the SDS one: its SAN matchers win).
    Sds {
        /// The secret.
        sds: SdsRef,
        /// `default_validation_context` of a combined context.
        default: Validation,
    },
}

/// TLS versions Envoy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// `TLSv1_2`.
    V12,
    /// `TLSv1_3`.
    V13,
}

/// `tls_params`, the supported part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// `tls_minimum_protocol_version` (`None` = Envoy's default: 1.2).
    pub min: Option<TlsVersion>,
    /// `tls_maximum_protocol_version` (`None` = 1.3).
    pub max: Option<TlsVersion>,
    /// `cipher_suites`, as rustls suite names (`None` = rustls' defaults).
    pub cipher_suites: Option<Vec<rustls::CipherSuite>>,
}

/// `CommonTlsContext`, the supported part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommonTls {
    /// Certificates in config order (static ones first, then SDS ones).
    pub certs: Vec<CertSource>,
    /// `validation_context*`.
    pub validation: Option<ValidationSource>,
    /// `alpn_protocols`.
    pub alpn: Vec<Vec<u8>>,
    /// `tls_params`.
    pub params: TlsParams,
}

/// `DownstreamTlsContext`.
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamTlsConfig {
    /// `common_tls_context`.
    pub common: CommonTls,
    /// `require_client_certificate`.
    pub require_client_certificate: bool,
    /// `!disable_stateless_session_resumption`: TLS session tickets.
    pub session_tickets: bool,
    /// `!disable_stateful_session_resumption`: server-side session cache.
    pub session_cache: bool,
}

/// `UpstreamTlsContext`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTlsConfig {
    /// `common_tls_context`.
    pub common: CommonTls,
    /// `sni` (empty: none, unless `auto_host_sni`).
    pub sni: String,
    /// `auto_host_sni`: SNI from the host's hostname (STRICT_DNS / EDS hostnames).
    pub auto_host_sni: bool,
    /// `auto_sni_san_validation`: the certificate must be valid for the SNI sent.
    pub auto_sni_san_validation: bool,
}

/// Read a `DataSource` (inline or file) at `path`.
pub fn data_source(
    ds: Option<&core::DataSource>,
    path: &str,
    errs: &mut Errors,
) -> Option<Vec<u8>> {
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

/// `TlsCertificate` at `path` (also the body of an SDS `tls_certificate` secret).
pub fn tls_certificate(c: &pb::TlsCertificate, path: &str, errs: &mut Errors) -> Option<CertPair> {
    errs.reject_unsupported(c, &["certificate_chain", "private_key"], path);
    let chain = data_source(
        c.certificate_chain.as_ref(),
        &join(path, "certificate_chain"),
        errs,
    );
    let key = data_source(c.private_key.as_ref(), &join(path, "private_key"), errs);
    let (chain, key) = (chain?, key?);
    // Parse now so a bad PEM is a config error with its path, not a handshake failure.
    let cp = CertPair { chain, key };
    if let Err(e) = super::certs::certified_key(&cp) {
        errs.add(path, e.to_string());
        return None;
    }
    Some(cp)
}

/// `CertificateValidationContext` at `path` (also the body of an SDS `validation_context`).
pub fn validation(
    v: &pb::CertificateValidationContext,
    path: &str,
    errs: &mut Errors,
) -> Validation {
    errs.reject_unsupported(
        v,
        &["trusted_ca", "match_typed_subject_alt_names", "crl"],
        path,
    );
    let trusted_ca = v
        .trusted_ca
        .as_ref()
        .and_then(|d| data_source(Some(d), &join(path, "trusted_ca"), errs));
    if let Some(ca) = &trusted_ca
        && let Err(e) = super::certs::root_store(ca)
    {
        errs.add(join(path, "trusted_ca"), e.to_string());
    }
    let crl = v
        .crl
        .as_ref()
        .and_then(|d| data_source(Some(d), &join(path, "crl"), errs));
    if let Some(c) = &crl
        && let Err(e) = super::certs::crls(c)
    {
        errs.add(join(path, "crl"), e.to_string());
    }
    let mut sans = Vec::new();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let p = format!("{path}.match_typed_subject_alt_names[{i}]");
        errs.reject_unsupported(m, &["san_type", "matcher"], &p);
        use pb::subject_alt_name_matcher::SanType as T;
        let san_type = match T::try_from(m.san_type) {
            Ok(T::Dns) => Some(SanType::Dns),
            Ok(T::Uri) => Some(SanType::Uri),
            Ok(T::Email) => Some(SanType::Email),
            Ok(T::IpAddress) => Some(SanType::Ip),
            _ => {
                errs.add(
                    join(&p, "san_type"),
                    "san_type must be DNS, URI, EMAIL or IP_ADDRESS",
                );
                None
            }
        };
        let matcher = match &m.matcher {
            Some(sm) => StrMatch::translate(sm, &join(&p, "matcher"), errs),
            None => {
                errs.add(join(&p, "matcher"), "required");
                None
            }
        };
        if let (Some(san_type), Some(matcher)) = (san_type, matcher) {
            sans.push(SanMatcher { san_type, matcher });
        }
    }
    Validation {
        trusted_ca,
        crl,
        sans,
    }
}

fn sds_ref(s: &pb::SdsSecretConfig, path: &str, errs: &mut Errors) -> Option<SdsRef> {
    errs.reject_unsupported(s, &["name", "sds_config"], path);
    if s.name.is_empty() {
        errs.add(join(path, "name"), "name is required");
    }
    let Some(cs) = &s.sds_config else {
        errs.add(
            join(path, "sds_config"),
            "sds_config is required (ads: {} or path_config_source)",
        );
        return None;
    };
    let src: ConfigSource = crate::config::source::translate(cs, &join(path, "sds_config"), errs)?;
    if s.name.is_empty() {
        return None;
    }
    Some(SdsRef {
        name: s.name.clone(),
        source: src.kind,
    })
}

fn version(v: i32, path: &str, errs: &mut Errors) -> Option<TlsVersion> {
    use pb::tls_parameters::TlsProtocol as P;
    match P::try_from(v) {
        Ok(P::TlsAuto) => None,
        Ok(P::TlSv12) => Some(TlsVersion::V12),
        Ok(P::TlSv13) => Some(TlsVersion::V13),
        _ => {
            errs.add(path, "only TLS_AUTO, TLSv1_2 and TLSv1_3 are supported");
            None
        }
    }
}

/// Envoy (OpenSSL) cipher names to rustls suites.
pub const CIPHERS: &[(&str, rustls::CipherSuite)] = {
    use rustls::CipherSuite as C;
    &[
        ("TLS_AES_128_GCM_SHA256", C::TLS13_AES_128_GCM_SHA256),
        ("TLS_AES_256_GCM_SHA384", C::TLS13_AES_256_GCM_SHA384),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            C::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            "ECDHE-RSA-AES128-GCM-SHA256",
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "ECDHE-RSA-AES256-GCM-SHA384",
            C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "ECDHE-RSA-CHACHA20-POLY1305",
            C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ]
};

/// Envoy's name of a rustls suite (for `ssl.ciphers.<name>` and `DownstreamTls.cipher`).
pub fn cipher_name(s: rustls::CipherSuite) -> String {
    CIPHERS
        .iter()
        .find(|(_, c)| *c == s)
        .map(|(n, _)| (*n).to_string())
        .unwrap_or_else(|| format!("{s:?}"))
}

fn tls_params(p: &pb::TlsParameters, path: &str, errs: &mut Errors) -> TlsParams {
    errs.reject_unsupported(
        p,
        &[
            "tls_minimum_protocol_version",
            "tls_maximum_protocol_version",
            "cipher_suites",
        ],
        path,
    );
    let min = version(
        p.tls_minimum_protocol_version,
        &join(path, "tls_minimum_protocol_version"),
        errs,
    );
    let max = version(
        p.tls_maximum_protocol_version,
        &join(path, "tls_maximum_protocol_version"),
        errs,
    );
    if let (Some(a), Some(b)) = (min, max)
        && a > b
    {
        errs.add(
            join(path, "tls_minimum_protocol_version"),
            "must not be above tls_maximum_protocol_version",
        );
    }
    let cipher_suites = (!p.cipher_suites.is_empty()).then(|| {
        let mut v = Vec::new();
        for (i, c) in p.cipher_suites.iter().enumerate() {
            // OpenSSL's `[A|B]` equal-preference groups: take each member.
            for name in c.trim_matches(|ch| ch == '[' || ch == ']').split('|') {
                match CIPHERS.iter().find(|(n, _)| *n == name) {
                    Some((_, s)) => v.push(*s),
                    None => errs.add(
                        format!("{path}.cipher_suites[{i}]"),
                        format!(
                            "cipher suite {name:?} is not supported (supported: {})",
                            CIPHERS
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
        }
        v
    });
    TlsParams {
        min,
        max,
        cipher_suites,
    }
}

fn common(c: &pb::CommonTlsContext, path: &str, errs: &mut Errors) -> CommonTls {
    use pb::common_tls_context::ValidationContextType as V;
    errs.reject_unsupported(
        c,
        &[
            "tls_params",
            "tls_certificates",
            "tls_certificate_sds_secret_configs",
            "alpn_protocols",
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        ],
        path,
    );
    let mut certs = Vec::new();
    for (i, t) in c.tls_certificates.iter().enumerate() {
        if let Some(cp) = tls_certificate(t, &format!("{path}.tls_certificates[{i}]"), errs) {
            certs.push(CertSource::Static(cp));
        }
    }
    for (i, s) in c.tls_certificate_sds_secret_configs.iter().enumerate() {
        if let Some(r) = sds_ref(
            s,
            &format!("{path}.tls_certificate_sds_secret_configs[{i}]"),
            errs,
        ) {
            certs.push(CertSource::Sds(r));
        }
    }
    let validation = match &c.validation_context_type {
        None => None,
        Some(V::ValidationContext(v)) => Some(ValidationSource::Static(validation(
            v,
            &join(path, "validation_context"),
            errs,
        ))),
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            sds_ref(s, &join(path, "validation_context_sds_secret_config"), errs).map(|sds| {
                ValidationSource::Sds {
                    sds,
                    default: Validation::default(),
                }
            })
        }
        Some(V::CombinedValidationContext(cv)) => {
            let p = join(path, "combined_validation_context");
            errs.reject_unsupported(
                cv,
                &[
                    "default_validation_context",
                    "validation_context_sds_secret_config",
                ],
                &p,
            );
            let default = cv
                .default_validation_context
                .as_ref()
                .map(|v| validation(v, &join(&p, "default_validation_context"), errs))
                .unwrap_or_default();
            match &cv.validation_context_sds_secret_config {
                Some(s) => sds_ref(s, &join(&p, "validation_context_sds_secret_config"), errs)
                    .map(|sds| ValidationSource::Sds { sds, default }),
                None => {
                    errs.add(join(&p, "validation_context_sds_secret_config"), "required");
                    None
                }
            }
        }
        Some(_) => {
            errs.add(
                path,
                "certificate provider validation contexts are not supported",
            );
            None
        }
    };
    let mut alpn = Vec::new();
    for (i, a) in c.alpn_protocols.iter().enumerate() {
        if a.is_empty() || a.len() > 255 {
            errs.add(
                format!("{path}.alpn_protocols[{i}]"),
                "must be 1 to 255 bytes",
            );
        } else {
            alpn.push(a.as_bytes().to_vec());
        }
    }
    let params = c
        .tls_params
        .as_ref()
        .map(|p| tls_params(p, &join(path, "tls_params"), errs))
        .unwrap_or_default();
    CommonTls {
        certs,
        validation,
        alpn,
        params,
    }
}

/// Unpack a `transport_socket` at `path`: `Ok(None)` for raw_buffer, `Ok(Some(ctx))` for TLS.
fn unpack<T: prost::Message + prost::Name + Default>(
    ts: &core::TransportSocket,
    want: &str,
    path: &str,
    errs: &mut Errors,
) -> Option<Option<T>> {
    errs.reject_unsupported(ts, &["name", "typed_config"], path);
    let tpath = join(path, "typed_config");
    match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(any)) if any.type_url == want => {
            match weir_xds_api::unpack::<T>(any) {
                Ok(c) => Some(Some(c)),
                Err(e) => {
                    errs.add(tpath, e.to_string());
                    None
                }
            }
        }
        Some(core::transport_socket::ConfigType::TypedConfig(any))
            if any
                .type_url
                .ends_with("transport_sockets.raw_buffer.v3.RawBuffer") =>
        {
            Some(None)
        }
        None if ts.name == RAW_SOCKET => Some(None),
        Some(core::transport_socket::ConfigType::TypedConfig(any)) => {
            errs.add(
                tpath,
                format!(
                    "transport socket {} is not supported (only {})",
                    weir_xds_api::type_name(&any.type_url),
                    weir_xds_api::type_name(want)
                ),
            );
            None
        }
        _ => {
            errs.add(
                tpath,
                format!("a {} is required", weir_xds_api::type_name(want)),
            );
            None
        }
    }
}

/// A filter chain's `transport_socket` at `path`: `None` for plain text or on error.
pub fn downstream(
    ts: &core::TransportSocket,
    path: &str,
    errs: &mut Errors,
) -> Option<DownstreamTlsConfig> {
    let ctx: pb::DownstreamTlsContext = unpack(ts, DOWNSTREAM_TLS, path, errs)??;
    let tpath = join(path, "typed_config");
    errs.reject_unsupported(
        &ctx,
        &[
            "common_tls_context",
            "require_client_certificate",
            "disable_stateless_session_resumption",
            "disable_stateful_session_resumption",
        ],
        &tpath,
    );
    let cpath = join(&tpath, "common_tls_context");
    let common = match &ctx.common_tls_context {
        Some(c) => common(c, &cpath, errs),
        None => CommonTls::default(),
    };
    if common.certs.is_empty() {
        errs.add(
            join(&cpath, "tls_certificates"),
            "a server needs at least one certificate (tls_certificates or \
             tls_certificate_sds_secret_configs)",
        );
    }
    let require_client_certificate = ctx.require_client_certificate.is_some_and(|b| b.value);
    if require_client_certificate && common.validation.is_none() {
        errs.add(
            join(&tpath, "require_client_certificate"),
            "requires common_tls_context.validation_context (trusted_ca) to verify client \
             certificates",
        );
    }
    use pb::downstream_tls_context::SessionTicketKeysType as K;
    let session_tickets = match &ctx.session_ticket_keys_type {
        Some(K::DisableStatelessSessionResumption(true)) => false,
        Some(K::DisableStatelessSessionResumption(false)) | None => true,
        Some(_) => {
            errs.add(
                &tpath,
                "session_ticket_keys / session_ticket_keys_sds_secret_config are not \
                 supported (weir rotates its own ticket keys)",
            );
            true
        }
    };
    Some(DownstreamTlsConfig {
        common,
        require_client_certificate,
        session_tickets,
        session_cache: !ctx.disable_stateful_session_resumption,
    })
}

/// A cluster's `transport_socket` at `path`: `None` for plain text or on error.
pub fn upstream(
    ts: &core::TransportSocket,
    path: &str,
    errs: &mut Errors,
) -> Option<UpstreamTlsConfig> {
    let ctx: pb::UpstreamTlsContext = unpack(ts, UPSTREAM_TLS, path, errs)??;
    let tpath = join(path, "typed_config");
    errs.reject_unsupported(
        &ctx,
        &[
            "common_tls_context",
            "sni",
            "auto_host_sni",
            "auto_sni_san_validation",
        ],
        &tpath,
    );
    let cpath = join(&tpath, "common_tls_context");
    let common = match &ctx.common_tls_context {
        Some(c) => common(c, &cpath, errs),
        None => CommonTls::default(),
    };
    if common.certs.len() > 1 {
        errs.add(
            join(&cpath, "tls_certificates"),
            "at most one client certificate is supported",
        );
    }
    if common.validation.is_none() {
        // weir never talks TLS to an upstream it cannot verify.
        errs.add(
            join(&cpath, "validation_context"),
            "a validation context (trusted_ca) is required: weir always verifies upstream \
             certificates",
        );
    }
    if !ctx.sni.is_empty() && rustls::pki_types::ServerName::try_from(ctx.sni.as_str()).is_err() {
        errs.add(join(&tpath, "sni"), "not a valid server name");
    }
    Some(UpstreamTlsConfig {
        common,
        sni: ctx.sni.clone(),
        auto_host_sni: ctx.auto_host_sni,
        auto_sni_san_validation: ctx.auto_sni_san_validation,
    })
}

/// An SDS `Secret` body.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretValue {
    /// `tls_certificate`.
    Certificate(CertPair),
    /// `validation_context`.
    Validation(Validation),
}

/// Translate a `Secret` at `path` into its name and value.
pub fn secret(s: &pb::Secret, path: &str, errs: &mut Errors) -> Option<(String, SecretValue)> {
    use pb::secret::Type;
    errs.reject_unsupported(s, &["name", "tls_certificate", "validation_context"], path);
    if s.name.is_empty() {
        errs.add(join(path, "name"), "name is required");
    }
    let v = match &s.r#type {
        Some(Type::TlsCertificate(c)) => {
            tls_certificate(c, &join(path, "tls_certificate"), errs).map(SecretValue::Certificate)
        }
        Some(Type::ValidationContext(v)) => {
            let before = errs.0.len();
            let v = validation(v, &join(path, "validation_context"), errs);
            (errs.0.len() == before).then_some(SecretValue::Validation(v))
        }
        _ => {
            errs.add(path, "tls_certificate or validation_context is required");
            None
        }
    }?;
    (!s.name.is_empty()).then(|| (s.name.clone(), v))
}

/// Paths of file SDS sources, for the watcher.
pub fn file_path(r: &SdsRef) -> Option<&PathBuf> {
    match &r.source {
        SourceKind::Path { path, .. } => Some(path),
        SourceKind::Ads => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["a.test".into()]).expect("cert");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn ts(ty: &str, ctx: serde_json::Value) -> core::TransportSocket {
        let mut ctx = ctx;
        ctx["@type"] = serde_json::Value::String(format!(
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{ty}"
        ));
        weir_xds_api::from_yaml(
            &serde_json::json!({"name": "envoy.transport_sockets.tls", "typed_config": ctx})
                .to_string(),
        )
        .expect("transport socket")
    }

    fn down(ctx: serde_json::Value) -> (Option<DownstreamTlsConfig>, Vec<String>) {
        let mut errs = Errors::default();
        let c = downstream(&ts("DownstreamTlsContext", ctx), "ts", &mut errs);
        (c, errs.0.into_iter().map(|e| e.path).collect())
    }

    fn up(ctx: serde_json::Value) -> (Option<UpstreamTlsConfig>, Vec<String>) {
        let mut errs = Errors::default();
        let c = upstream(&ts("UpstreamTlsContext", ctx), "ts", &mut errs);
        (c, errs.0.into_iter().map(|e| e.path).collect())
    }

    fn certs_json(cert: &str, key: &str) -> serde_json::Value {
        serde_json::json!([{"certificate_chain": {"inline_string": cert},
                            "private_key": {"inline_string": key}}])
    }

    #[test]
    fn downstream_good() {
        let (cert, key) = pair();
        let (c, errs) = down(serde_json::json!({
            "common_tls_context": {
                "tls_certificates": certs_json(&cert, &key),
                "validation_context": {
                    "trusted_ca": {"inline_string": cert},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://td/"}},
                        {"san_type": "DNS", "matcher": {"safe_regex": {"regex": "[a-z]+\\.test"}}},
                    ],
                },
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                    "cipher_suites": ["[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-ECDSA-AES128-GCM-SHA256]", "TLS_AES_128_GCM_SHA256"],
                },
            },
            "require_client_certificate": true,
            "disable_stateless_session_resumption": true,
        }));
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.expect("config");
        assert!(c.require_client_certificate);
        assert!(!c.session_tickets);
        assert!(c.session_cache);
        assert_eq!(c.common.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(c.common.params.min, Some(TlsVersion::V12));
        assert_eq!(
            c.common.params.cipher_suites.as_ref().map(Vec::len),
            Some(3)
        );
        let Some(ValidationSource::Static(v)) = &c.common.validation else {
            panic!("static validation")
        };
        assert_eq!(v.sans.len(), 2);
    }

    #[test]
    fn downstream_errors_name_their_paths() {
        let (cert, key) = pair();
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"common_tls_context": {}}),
                "ts.typed_config.common_tls_context.tls_certificates",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key)},
                                   "require_client_certificate": true}),
                "ts.typed_config.require_client_certificate",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "tls_params": {"cipher_suites": ["RC4-MD5"]}}}),
                "ts.typed_config.common_tls_context.tls_params.cipher_suites[0]",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_2"}}}),
                "ts.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_0"}}}),
                "ts.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json("not a pem", &key)}}),
                "ts.typed_config.common_tls_context.tls_certificates[0]",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key)},
                                   "ocsp_staple_policy": "MUST_STAPLE"}),
                "ts.typed_config.ocsp_staple_policy",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "validation_context": {"trusted_ca": {"inline_string": cert},
                        "match_typed_subject_alt_names": [{"matcher": {"exact": "x"}}]}}}),
                "ts.typed_config.common_tls_context.validation_context.match_typed_subject_alt_names[0].san_type",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "validation_context": {"trusted_ca": {"inline_string": cert},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"safe_regex": {"regex": "("}}}]}}}),
                "ts.typed_config.common_tls_context.validation_context.match_typed_subject_alt_names[0].matcher.safe_regex.regex",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                    "validation_context": {"trusted_ca": {"filename": "/nonexistent/ca.pem"}}}}),
                "ts.typed_config.common_tls_context.validation_context.trusted_ca.filename",
            ),
            (
                serde_json::json!({"common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "x"}]}}),
                "ts.typed_config.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config",
            ),
        ];
        for (ctx, want) in cases {
            let (_, errs) = down(ctx.clone());
            assert!(
                errs.iter().any(|e| e == want),
                "{ctx}: want {want}, got {errs:?}"
            );
        }
    }

    #[test]
    fn other_transport_sockets() {
        let mut errs = Errors::default();
        let raw: core::TransportSocket =
            weir_xds_api::from_yaml("name: envoy.transport_sockets.raw_buffer").expect("raw");
        assert!(downstream(&raw, "ts", &mut errs).is_none());
        assert!(errs.is_empty());
        let alts: core::TransportSocket = weir_xds_api::from_yaml(
            "name: x\ntyped_config: {'@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext}",
        )
        .expect("wrong type");
        assert!(downstream(&alts, "ts", &mut errs).is_none());
        assert_eq!(errs.0[0].path, "ts.typed_config");
    }

    #[test]
    fn upstream_rules() {
        let (cert, key) = pair();
        let (c, errs) = up(serde_json::json!({
            "sni": "backend.test", "auto_sni_san_validation": true,
            "common_tls_context": {"tls_certificates": certs_json(&cert, &key),
                                   "validation_context": {"trusted_ca": {"inline_string": cert}}},
        }));
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.expect("config");
        assert_eq!(c.sni, "backend.test");
        assert!(c.auto_sni_san_validation);
        let (_, errs) = up(serde_json::json!({"common_tls_context": {}}));
        assert_eq!(
            errs,
            ["ts.typed_config.common_tls_context.validation_context"]
        );
        let (_, errs) = up(serde_json::json!({"sni": "bad name!",
            "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": cert}}}}));
        assert_eq!(errs, ["ts.typed_config.sni"]);
        let (_, errs) = up(serde_json::json!({"allow_renegotiation": true,
            "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": cert}}}}));
        assert_eq!(errs, ["ts.typed_config.allow_renegotiation"]);
    }

    #[test]
    fn san_matching() {
        let m = |t, s: StrMatch| SanMatcher {
            san_type: t,
            matcher: s,
        };
        let sans = Sans {
            dns: vec!["*.example.com".into(), "api.test".into()],
            uri: vec!["spiffe://td/ns/a/sa/b".into()],
            ..Default::default()
        };
        assert!(sans_match(&[], &sans));
        assert!(sans_match(
            &[m(
                SanType::Uri,
                StrMatch::Exact("spiffe://td/ns/a/sa/b".into(), false)
            )],
            &sans
        ));
        assert!(!sans_match(
            &[m(
                SanType::Dns,
                StrMatch::Exact("spiffe://td/ns/a/sa/b".into(), false)
            )],
            &sans
        ));
        // A wildcard SAN covers one label for exact DNS matchers.
        assert!(sans_match(
            &[m(
                SanType::Dns,
                StrMatch::Exact("www.example.com".into(), false)
            )],
            &sans
        ));
        assert!(!sans_match(
            &[m(
                SanType::Dns,
                StrMatch::Exact("a.b.example.com".into(), false)
            )],
            &sans
        ));
        assert!(sans_match(
            &[m(SanType::Dns, StrMatch::Suffix(".TEST".into(), true))],
            &sans
        ));
        assert!(!sans_match(
            &[m(SanType::Dns, StrMatch::Suffix(".TEST".into(), false))],
            &sans
        ));
        assert!(sans_match(
            &[m(SanType::Uri, StrMatch::Contains("/ns/a/".into(), false))],
            &sans
        ));
        let re =
            StrMatch::Regex(regex::Regex::new(r"\A(?:spiffe://td/ns/[a-z]+/sa/b)\z").expect("re"));
        assert!(sans_match(&[m(SanType::Uri, re)], &sans));
        // Any matcher suffices.
        assert!(sans_match(
            &[
                m(
                    SanType::Uri,
                    StrMatch::Prefix("spiffe://other/".into(), false)
                ),
                m(SanType::Dns, StrMatch::Exact("api.test".into(), false)),
            ],
            &sans
        ));
        assert!(!sans_match(
            &[m(SanType::Email, StrMatch::Contains("@".into(), false))],
            &sans
        ));
    }

    #[test]
    fn secrets_translate() {
        let (cert, key) = pair();
        let s: pb::Secret = weir_xds_api::from_yaml(
            &serde_json::json!({"name": "default", "tls_certificate": certs_json(&cert, &key)[0]})
                .to_string(),
        )
        .expect("secret");
        let mut errs = Errors::default();
        let (name, v) = secret(&s, "s", &mut errs).expect("valid");
        assert_eq!(name, "default");
        assert!(matches!(v, SecretValue::Certificate(_)));
        let s: pb::Secret =
            weir_xds_api::from_yaml("name: x\nsession_ticket_keys: {keys: [{inline_string: k}]}")
                .expect("secret");
        assert!(secret(&s, "s", &mut errs).is_none());
        assert!(
            errs.0.iter().any(|e| e.path == "s.session_ticket_keys"),
            "{errs:?}"
        );
    }
}
