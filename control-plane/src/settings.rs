//! weir-cp's own config file (`weir-cp serve --config FILE`, YAML or JSON).
//!
//! ```yaml
//! auth:                      # who may call the control-plane APIs (see crate::auth)
//!   tokens:
//!   - name: proxies
//!     token_file: /etc/weir-cp/proxies.token   # or `token: ...` inline
//!     scopes: [xds:read]
//!   client_certs:            # mTLS: a verified client certificate's SAN -> scopes
//!   - san: spiffe://example.org/weir/proxy
//!     scopes: [xds:read]
//!   tls:                     # TLS on the gRPC server and the HTTP API
//!     cert_file: /etc/weir-cp/tls/server.pem
//!     key_file: /etc/weir-cp/tls/server.key
//!     client_ca_file: /etc/weir-cp/tls/clients-ca.pem
//! ca:                        # the mesh CA issuing workload certificates (see crate::ca)
//!   trust_domain: cluster.local
//!   workload_cert_ttl: 24h
//! s3:                        # the S3-compatible endpoint (see crate::objects)
//!   region: us-east-1
//!   access_keys:
//!   - access_key_id: AKIAWEIREXAMPLE
//!     secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
//!     scopes: [objects:read, objects:write]
//! limits:                    # per-client request rates (see crate::ratelimit)
//!   requests_per_second: 50
//!   burst: 100
//! inject:                    # the sidecar injection webhook (see crate::inject)
//!   tls: {cert_file: /etc/weir-cp/webhook/tls.crt, key_file: /etc/weir-cp/webhook/tls.key}
//!   proxy_image: weir/weir:0.1.0
//!   xds_address: weir-cp.weir-system.svc:18000
//! ```
//!
//! Unknown fields are errors (a typo must not silently open an API). Each subsystem owns its
//! section's struct; this module only ties them together and loads the file.

use std::path::Path;

/// The whole file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// API authentication and authorization.
    #[serde(default)]
    pub auth: AuthSettings,
    /// The S3-compatible endpoint.
    #[serde(default)]
    pub s3: S3Settings,
    /// The mesh CA (see `crate::ca`).
    #[serde(default)]
    pub ca: crate::ca::CaSettings,
    /// Credentials of the `--objects s3://…` backend (else the AWS_* environment).
    #[serde(default)]
    pub objects_backend: Option<crate::objects::remote::Credentials>,
    /// The Kubernetes sidecar injector (see `crate::inject`), served with
    /// `serve --webhook-address`.
    #[serde(default)]
    pub inject: Option<crate::inject::InjectSettings>,
    /// Per-client request-rate limits on every API (see `crate::ratelimit`).
    #[serde(default)]
    pub limits: crate::ratelimit::LimitSettings,
}

/// A permission a credential carries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
pub enum Scope {
    /// Subscribe to xDS (ADS, SotW and delta).
    #[serde(rename = "xds:read")]
    XdsRead,
    /// Apply and roll back config.
    #[serde(rename = "config:write")]
    ConfigWrite,
    /// Register, deregister and heartbeat instances.
    #[serde(rename = "registry:write")]
    RegistryWrite,
    /// Read the KV store.
    #[serde(rename = "kv:read")]
    KvRead,
    /// Write the KV store.
    #[serde(rename = "kv:write")]
    KvWrite,
    /// Read objects.
    #[serde(rename = "objects:read")]
    ObjectsRead,
    /// Write objects.
    #[serde(rename = "objects:write")]
    ObjectsWrite,
}

impl Scope {
    /// Every scope, in declaration order.
    pub const ALL: [Scope; 7] = [
        Scope::XdsRead,
        Scope::ConfigWrite,
        Scope::RegistryWrite,
        Scope::KvRead,
        Scope::KvWrite,
        Scope::ObjectsRead,
        Scope::ObjectsWrite,
    ];

    /// The name used in settings files, logs and metrics (`xds:read`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::XdsRead => "xds:read",
            Scope::ConfigWrite => "config:write",
            Scope::RegistryWrite => "registry:write",
            Scope::KvRead => "kv:read",
            Scope::KvWrite => "kv:write",
            Scope::ObjectsRead => "objects:read",
            Scope::ObjectsWrite => "objects:write",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `auth:` (see `crate::auth` and docs/design/auth.md). With no `tokens` and no
/// `client_certs`, weir-cp runs open, and only when every listening address is loopback.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Bearer tokens and their scopes.
    #[serde(default)]
    pub tokens: Vec<TokenSettings>,
    /// Client certificates (verified against `tls.client_ca_file`) whose SAN maps to scopes.
    #[serde(default)]
    pub client_certs: Vec<ClientCertSettings>,
    /// TLS for the gRPC server and the HTTP API.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
}

/// One `auth.client_certs` rule.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertSettings {
    /// A subject alternative name of the client's (leaf) certificate, matched exactly: a URI
    /// (e.g. a SPIFFE id `spiffe://example.org/ns/mesh/sa/weir`) or a DNS name.
    pub san: String,
    /// What a certificate with that SAN may do.
    pub scopes: Vec<Scope>,
    /// Workload identities (SPIFFE IDs; `*` matches within one path segment, a lone `*` any
    /// identity of the trust domain) this credential may obtain mesh certificates for over
    /// SDS (see `crate::ca`). Default: none.
    #[serde(default)]
    pub workload_identities: Vec<String>,
}

/// `auth.tls`: server certificate and, optionally, the CA that client certificates must
/// chain to (client certificates are then requested, but optional: token clients still
/// connect).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert_file: std::path::PathBuf,
    /// PEM private key of the server.
    pub key_file: std::path::PathBuf,
    /// PEM CA certificate(s) client certificates are verified against.
    #[serde(default)]
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// One bearer token (its `Debug` hides the token).
#[derive(Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// A name for logs and metrics (never the token itself).
    pub name: String,
    /// The token, inline.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (trailing whitespace ignored).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Workload identities this token may obtain mesh certificates for (as
    /// [`ClientCertSettings::workload_identities`]).
    #[serde(default)]
    pub workload_identities: Vec<String>,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSettings")
            .field("name", &self.name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("scopes", &self.scopes)
            .field("workload_identities", &self.workload_identities)
            .finish()
    }
}

/// `s3:`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// The region SigV4 signatures are scoped to (default `us-east-1`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Access keys accepted by the S3 endpoint.
    #[serde(default)]
    pub access_keys: Vec<AccessKeySettings>,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            region: default_region(),
            access_keys: Vec::new(),
        }
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

/// One S3 access key.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeySettings {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// What it may do (default: objects:read and objects:write).
    #[serde(default = "default_s3_scopes")]
    pub scopes: Vec<Scope>,
}

fn default_s3_scopes() -> Vec<Scope> {
    vec![Scope::ObjectsRead, Scope::ObjectsWrite]
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid settings.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong (with the field path where serde knows it).
        message: String,
    },
}

impl Settings {
    /// Parse settings text (YAML or JSON).
    pub fn parse(text: &str, path: &str) -> Result<Self, SettingsError> {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| SettingsError::Invalid {
            path: path.to_string(),
            message: format!("{}: {}", e.path(), e.inner()),
        })
    }

    /// Load the file.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_typos() {
        let s = Settings::parse(
            "auth:\n  tokens:\n  - {name: p, token: t, scopes: ['xds:read', 'kv:write']}\ns3:\n  access_keys:\n  - {access_key_id: A, secret_access_key: S}\n",
            "f",
        )
        .expect("valid");
        assert_eq!(s.auth.tokens[0].scopes, [Scope::XdsRead, Scope::KvWrite]);
        assert_eq!(s.s3.region, "us-east-1");
        assert_eq!(
            s.s3.access_keys[0].scopes,
            [Scope::ObjectsRead, Scope::ObjectsWrite]
        );
        let e = Settings::parse("auth: {tokenz: []}\n", "f").expect_err("typo");
        assert!(e.to_string().contains("tokenz"), "{e}");
        let e = Settings::parse("auth: {tokens: [{name: p, scopes: ['xds:write']}]}\n", "f")
            .expect_err("bad scope");
        assert!(e.to_string().contains("auth.tokens[0].scopes"), "{e}");
        assert!(Settings::parse("", "f").is_ok());
        let dbg = format!("{:?}", s.auth.tokens[0]);
        assert!(dbg.contains("redacted") && !dbg.contains("\"t\""), "{dbg}");
    }
}
