//! Authentication and authorization of every weir-cp API (see docs/design/auth.md).
//!
//! - Credentials: bearer tokens (`authorization: Bearer TOKEN`, HTTP header or gRPC
//!   metadata) from `auth.tokens` in the settings file, and TLS client certificates verified
//!   against `auth.tls.client_ca_file`, whose subject alternative names (URI, e.g. a SPIFFE
//!   id, or DNS) map to scopes through `auth.client_certs`. A presented token takes
//!   precedence over a client certificate; a wrong token is refused even when a good
//!   certificate is presented.
//! - [`Authenticator::authenticate`] turns credentials into an [`Identity`] (a name for logs
//!   and a set of [`Scope`]s); [`Authenticator::authorize`] checks a [`Required`] permission,
//!   counts and logs the outcome; [`check`] is the bare scope test.
//! - gRPC: [`grpc::AuthLayer`], one tower layer around the whole router, with the
//!   method → scope table [`grpc::required_for`]. HTTP: [`Authenticator::http`] for the
//!   config API (and any other HTTP endpoint).
//! - Open mode: with no tokens and no client-certificate rules, every request is allowed as
//!   the identity `anonymous`, but only when every listening address is loopback
//!   ([`open_mode`]); the server logs a loud warning. Otherwise it refuses to start.
//! - Tokens are compared in constant time ([`ct_eq`]) and never logged; logs and metrics
//!   carry the credential's *name*.
//! - [`tls`]: server TLS (tonic for gRPC, tokio-rustls for HTTP); [`client`]: the CLI's
//!   `--token` / `WEIR_CP_TOKEN`, `--ca-file`, `--cert-file`, `--key-file`.

pub mod client;
pub mod grpc;
pub mod tls;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use tokio_rustls::rustls::pki_types::CertificateDer;

use crate::settings::AuthSettings;
pub use crate::settings::Scope;

/// Shortest accepted token, characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// How an identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A bearer token.
    Token,
    /// A verified TLS client certificate.
    ClientCert,
    /// Open mode (no credentials configured, loopback only).
    Open,
    /// Established by another subsystem (e.g. S3 access keys).
    Other,
}

/// Who is calling, and what they may do. Inserted into the request extensions of every
/// authorized gRPC call (`request.extensions().get::<Identity>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The credential's name (token name or certificate SAN; never a secret).
    pub name: String,
    /// How it was established.
    pub method: Method,
    /// Its scopes (every scope in open mode).
    pub scopes: BTreeSet<Scope>,
    /// Workload identity patterns it may obtain mesh certificates for (`crate::ca`).
    pub workloads: Vec<String>,
}

impl Identity {
    /// An identity established elsewhere (e.g. from an S3 access key).
    pub fn new(name: impl Into<String>, scopes: impl IntoIterator<Item = Scope>) -> Self {
        Identity {
            name: name.into(),
            method: Method::Other,
            scopes: scopes.into_iter().collect(),
            workloads: Vec::new(),
        }
    }

    /// The open-mode identity: every scope, every method.
    pub fn anonymous() -> Self {
        Identity {
            name: "anonymous".into(),
            method: Method::Open,
            scopes: Scope::ALL.into_iter().collect(),
            workloads: Vec::new(),
        }
    }
}

/// Whether `identity` carries `scope`.
pub fn check(identity: &Identity, scope: Scope) -> bool {
    identity.method == Method::Open || identity.scopes.contains(&scope)
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Nothing (health checks).
    Nothing,
    /// Any authenticated identity (reads of config, registry and status).
    Authenticated,
    /// This scope.
    Scope(Scope),
    /// An unknown method: refused (PERMISSION_DENIED) to everyone but open mode, so a new
    /// method without a table entry is never silently open.
    Unknown,
}

impl Required {
    /// The metrics label of an allowed call.
    fn label(self) -> &'static str {
        match self {
            Required::Nothing => "none",
            Required::Authenticated | Required::Unknown => "authenticated",
            Required::Scope(s) => s.as_str(),
        }
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials, or wrong ones (gRPC UNAUTHENTICATED, HTTP 401).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials without the needed scope (gRPC PERMISSION_DENIED, HTTP 403).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl Denied {
    /// The gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Denied::Unauthenticated(_) => tonic::Status::unauthenticated(self.to_string()),
            Denied::PermissionDenied(_) => tonic::Status::permission_denied(self.to_string()),
        }
    }

    /// The HTTP answer: 401 with `www-authenticate: Bearer` or 403, as JSON
    /// `{"error": ...}` (the config API's error shape).
    pub fn to_http(&self) -> http::Response<Full<Bytes>> {
        let (status, challenge) = match self {
            Denied::Unauthenticated(_) => (http::StatusCode::UNAUTHORIZED, true),
            Denied::PermissionDenied(_) => (http::StatusCode::FORBIDDEN, false),
        };
        let body = serde_json::json!({ "error": self.to_string(), "errors": [] });
        let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if challenge {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"weir-cp\""),
            );
        }
        r
    }
}

/// The `auth:` settings cannot be used, or the server may not run open.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A token entry is wrong.
    #[error("auth.tokens[{index}] ({name:?}): {message}")]
    Token {
        /// Position in `auth.tokens`.
        index: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A client-certificate rule is wrong.
    #[error("auth.client_certs[{index}]: {message}")]
    ClientCert {
        /// Position in `auth.client_certs`.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// TLS files cannot be used.
    #[error("auth.tls: {0}")]
    Tls(String),
    /// No credentials configured and a non-loopback listener.
    #[error(
        "refusing to start: weir-cp would listen on {addr} (not loopback) WITHOUT \
         authentication; configure auth.tokens or auth.client_certs in the --config file, or \
         bind every address to 127.0.0.1 / ::1"
    )]
    OpenOnNonLoopback {
        /// The offending address.
        addr: SocketAddr,
    },
}

/// Whether to run open: `Ok(false)` when credentials are configured; `Ok(true)` when none are
/// and every address is loopback; an error otherwise.
pub fn open_mode(has_credentials: bool, addrs: &[SocketAddr]) -> Result<bool, AuthConfigError> {
    if has_credentials {
        return Ok(false);
    }
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        Some(addr) => Err(AuthConfigError::OpenOnNonLoopback { addr: *addr }),
        None => Ok(true),
    }
}

/// Constant-time equality of a presented token with a secret: the time depends only on the
/// secret's length, not on where (or whether) they differ, nor on the presented length.
pub fn ct_eq(secret: &[u8], presented: &[u8]) -> bool {
    let mut diff: u8 = u8::from(secret.len() != presented.len());
    for (i, s) in secret.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!*s);
        diff |= s ^ p;
    }
    std::hint::black_box(diff) == 0
}

struct Token {
    name: String,
    secret: Vec<u8>,
    scopes: BTreeSet<Scope>,
    workloads: Vec<String>,
}

struct CertRule {
    san: String,
    scopes: BTreeSet<Scope>,
    workloads: Vec<String>,
}

/// Counters: `weir_cp_auth_denied_total{reason}`, `weir_cp_auth_allowed_total{scope}`.
#[derive(Debug, Default)]
struct AuthMetrics {
    unauthenticated: AtomicU64,
    permission_denied: AtomicU64,
    /// Indexed like [`ALLOWED_LABELS`].
    allowed: [AtomicU64; ALLOWED_LABELS.len()],
}

const ALLOWED_LABELS: [&str; 9] = [
    "none",
    "authenticated",
    "xds:read",
    "config:write",
    "registry:write",
    "kv:read",
    "kv:write",
    "objects:read",
    "objects:write",
];

/// Turns credentials into identities and checks them (see the module docs).
pub struct Authenticator {
    tokens: Vec<Token>,
    cert_rules: Vec<CertRule>,
    open: bool,
    metrics: AuthMetrics,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: secrets never reach a log line.
        f.debug_struct("Authenticator")
            .field(
                "tokens",
                &self.tokens.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .field(
                "client_certs",
                &self.cert_rules.iter().map(|r| &r.san).collect::<Vec<_>>(),
            )
            .field("open", &self.open)
            .finish()
    }
}

impl Authenticator {
    /// Open mode: every request is allowed as [`Identity::anonymous`].
    pub fn open() -> Self {
        Authenticator {
            tokens: Vec::new(),
            cert_rules: Vec::new(),
            open: true,
            metrics: AuthMetrics::default(),
        }
    }

    /// From the `auth:` settings (reads `token_file`s). With no credentials configured the
    /// result is in open mode; [`open_mode`] decides whether that may run.
    pub fn from_settings(s: &AuthSettings) -> Result<Self, AuthConfigError> {
        let mut tokens: Vec<Token> = Vec::new();
        for (index, t) in s.tokens.iter().enumerate() {
            let err = |message: String| AuthConfigError::Token {
                index,
                name: t.name.clone(),
                message,
            };
            let secret = match (&t.token, &t.token_file) {
                (Some(tok), None) => tok.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .map_err(|e| err(format!("reading token_file {}: {e}", path.display())))?
                    .trim_end()
                    .to_string(),
                (Some(_), Some(_)) => return Err(err("set token or token_file, not both".into())),
                (None, None) => return Err(err("set token or token_file".into())),
            };
            if t.name.is_empty() {
                return Err(err("the name must not be empty".into()));
            }
            if secret.len() < MIN_TOKEN_LEN {
                return Err(err(format!(
                    "the token must be at least {MIN_TOKEN_LEN} characters"
                )));
            }
            if !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    "the token must be printable ASCII without spaces (it is sent in a header)"
                        .into(),
                ));
            }
            if t.scopes.is_empty() {
                return Err(err("no scopes".into()));
            }
            if tokens.iter().any(|o| o.name == t.name) {
                return Err(err("duplicate name".into()));
            }
            if tokens.iter().any(|o| o.secret == secret.as_bytes()) {
                return Err(err("the same token as another entry".into()));
            }
            tokens.push(Token {
                name: t.name.clone(),
                secret: secret.into_bytes(),
                scopes: t.scopes.iter().copied().collect(),
                workloads: t.workload_identities.clone(),
            });
        }
        let mut cert_rules = Vec::new();
        if !s.client_certs.is_empty()
            && s.tls
                .as_ref()
                .and_then(|t| t.client_ca_file.as_ref())
                .is_none()
        {
            return Err(AuthConfigError::ClientCert {
                index: 0,
                message: "client_certs need auth.tls.client_ca_file (to verify certificates)"
                    .into(),
            });
        }
        for (index, c) in s.client_certs.iter().enumerate() {
            if c.san.is_empty() {
                return Err(AuthConfigError::ClientCert {
                    index,
                    message: "empty san".into(),
                });
            }
            if c.scopes.is_empty() {
                return Err(AuthConfigError::ClientCert {
                    index,
                    message: "no scopes".into(),
                });
            }
            cert_rules.push(CertRule {
                san: c.san.clone(),
                scopes: c.scopes.iter().copied().collect(),
                workloads: c.workload_identities.clone(),
            });
        }
        let open = tokens.is_empty() && cert_rules.is_empty();
        Ok(Authenticator {
            tokens,
            cert_rules,
            open,
            metrics: AuthMetrics::default(),
        })
    }

    /// Whether this runs open (no credentials configured).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Who presents `authorization` (a header value, `Bearer TOKEN`) and/or the verified
    /// `peer_certs` (leaf first).
    pub fn authenticate(
        &self,
        authorization: Option<&http::HeaderValue>,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Identity, Denied> {
        if self.open {
            // Nothing to check against: whatever is presented, the caller is anonymous.
            return Ok(Identity::anonymous());
        }
        if let Some(value) = authorization {
            return self.token_identity(value);
        }
        if let Some(leaf) = peer_certs.and_then(|c| c.first()) {
            return self.cert_identity(leaf);
        }
        Err(Denied::Unauthenticated(
            "no credentials (send `authorization: Bearer TOKEN` or a client certificate)".into(),
        ))
    }

    fn token_identity(&self, value: &http::HeaderValue) -> Result<Identity, Denied> {
        let presented = parse_bearer(value.as_bytes())
            .ok_or_else(|| Denied::Unauthenticated("malformed authorization header".into()))?;
        // Compare with every token (no early exit), so timing does not tell which matched.
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if ct_eq(&t.secret, presented) {
                found = Some(t);
            }
        }
        match found {
            Some(t) => Ok(Identity {
                name: t.name.clone(),
                method: Method::Token,
                scopes: t.scopes.clone(),
                workloads: t.workloads.clone(),
            }),
            None => Err(Denied::Unauthenticated("unknown token".into())),
        }
    }

    fn cert_identity(&self, leaf: &CertificateDer<'_>) -> Result<Identity, Denied> {
        let sans = tls::subject_alt_names(leaf)
            .map_err(|e| Denied::Unauthenticated(format!("client certificate: {e}")))?;
        let mut scopes = BTreeSet::new();
        let mut workloads = Vec::new();
        let mut name = None;
        for rule in &self.cert_rules {
            if sans.contains(&rule.san) {
                scopes.extend(rule.scopes.iter().copied());
                workloads.extend(rule.workloads.iter().cloned());
                name.get_or_insert_with(|| rule.san.clone());
            }
        }
        match name {
            Some(name) => Ok(Identity {
                name,
                method: Method::ClientCert,
                scopes,
                workloads,
            }),
            // Verified by the CA, but mapped to nothing: authenticated, without scopes.
            None => Ok(Identity {
                name: sans
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "client certificate without SAN".into()),
                method: Method::ClientCert,
                scopes: BTreeSet::new(),
                workloads: Vec::new(),
            }),
        }
    }

    /// Check `required` for an authentication result, counting and logging the outcome
    /// (`method` names the call: a gRPC path or `METHOD /path`).
    pub fn authorize(
        &self,
        authenticated: Result<Identity, Denied>,
        required: Required,
        method: &str,
    ) -> Result<Identity, Denied> {
        let r = authenticated.and_then(|id| {
            let ok = match required {
                Required::Nothing | Required::Authenticated => true,
                Required::Scope(s) => check(&id, s),
                Required::Unknown => id.method == Method::Open,
            };
            if ok {
                Ok(id)
            } else {
                let what = match required {
                    Required::Scope(s) => format!("{method} needs scope {s}"),
                    _ => format!("no scope is defined for {method}"),
                };
                tracing::info!(credential = %id.name, %method, "auth: permission denied");
                Err(Denied::PermissionDenied(format!("{} ({what})", id.name)))
            }
        });
        match &r {
            Ok(_) => {
                let i = ALLOWED_LABELS
                    .iter()
                    .position(|l| *l == required.label())
                    .unwrap_or(1);
                self.metrics.allowed[i].fetch_add(1, Ordering::Relaxed);
            }
            Err(d) => {
                if let Denied::Unauthenticated(why) = d {
                    tracing::info!(%method, reason = %why, "auth: unauthenticated request");
                }
                match d {
                    Denied::Unauthenticated(_) => &self.metrics.unauthenticated,
                    Denied::PermissionDenied(_) => &self.metrics.permission_denied,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// Authenticate and authorize an HTTP request: `required` for `method`, from its
    /// `authorization` header and the connection's verified client certificates.
    pub fn http(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
        required: Required,
        method: &str,
    ) -> Result<Identity, Denied> {
        if required == Required::Nothing {
            return self.authorize(Ok(Identity::anonymous()), required, method);
        }
        let id = self.authenticate(headers.get(http::header::AUTHORIZATION), peer_certs);
        self.authorize(id, required, method)
    }

    /// `(reason, count)` of refusals.
    pub fn denied_counts(&self) -> [(&'static str, u64); 2] {
        [
            (
                "unauthenticated",
                self.metrics.unauthenticated.load(Ordering::Relaxed),
            ),
            (
                "permission_denied",
                self.metrics.permission_denied.load(Ordering::Relaxed),
            ),
        ]
    }
}

impl crate::metrics::Collector for Authenticator {
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str(
            "# HELP weir_cp_auth_denied_total API requests refused by authentication \
             (unauthenticated) or authorization (permission_denied).\n\
             # TYPE weir_cp_auth_denied_total counter\n",
        );
        for (reason, n) in self.denied_counts() {
            let _ = writeln!(out, "weir_cp_auth_denied_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str(
            "# HELP weir_cp_auth_allowed_total API requests allowed, by the scope they needed \
             (\"authenticated\": any identity, \"none\": open endpoints).\n\
             # TYPE weir_cp_auth_allowed_total counter\n",
        );
        for (label, n) in ALLOWED_LABELS.iter().zip(&self.metrics.allowed) {
            let _ = writeln!(
                out,
                "weir_cp_auth_allowed_total{{scope=\"{label}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// The token of `Bearer TOKEN` (scheme case-insensitive, one or more spaces).
pub fn parse_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|b| *b != b' ')?;
    let token = &rest[start..];
    let end = token
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |e| e + 1);
    let token = &token[..end];
    (!token.is_empty() && !token.contains(&b' ')).then_some(token)
}

#[cfg(test)]
mod tests;
