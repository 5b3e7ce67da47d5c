//! The config API: HTTP/1.1 + JSON on `--api-address`, and the client the CLI uses.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/config?target=T` | a document (YAML or JSON, see [`crate::validate`]) | `200` [`VersionInfo`]; `400` `{"error", "errors": [{path, message}]}` |
//! | `GET /v1/config[?target=T]` | — | `{"targets": [{"target", "version", "document"}]}` (`document` re-appliable) |
//! | `GET /v1/history` | — | `[VersionInfo]`, oldest first |
//! | `POST /v1/rollback/N` | — | `200` [`VersionInfo`] of the new version; `404` unknown N; `400` no longer valid |
//! | `GET /v1/status` | — | [`Status`]: config version, connected proxies, NACKs |
//! | `GET /metrics` | — | Prometheus text ([`crate::metrics`]) |
//! | `GET /healthz` | — | `200 ok` |
//!
//! `T` is `all` (default), `cluster:NAME` or `node:ID`. Request bodies are limited to
//! [`MAX_BODY`]. An apply answers only after the version is committed to the store.
//!
//! ## Authentication
//! Every endpoint but `/healthz` needs credentials ([`crate::auth`]): `POST`s need the
//! `config:write` scope, `GET`s any authenticated identity ([`required`]). Refusals are
//! `401` (with `www-authenticate: Bearer`) or `403`, JSON [`ErrorBody`], decided before the
//! body is read. With `auth.tls` the API is served over TLS (HTTP/1.1, tokio-rustls) and
//! client certificates are accepted as credentials.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::ControlPlane;
use crate::auth::{Authenticator, Required, Scope};
use crate::operator::{ApplyError, Target, VersionInfo};
use crate::status::StatusReport;
use crate::validate::FieldError;

/// Largest request body accepted, bytes.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// `GET /v1/status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// Latest applied config version (0: none).
    pub config_version: u64,
    /// Connected proxies and NACKs.
    #[serde(flatten)]
    pub report: StatusReport,
}

/// An error answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// Summary.
    pub error: String,
    /// Field errors, for a refused document.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

type Resp = hyper::Response<Full<Bytes>>;

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec_pretty(v)
        .unwrap_or_else(|e| format!("{{\"error\":\"encoding the answer: {e}\"}}").into_bytes());
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl Into<String>, errors: Vec<FieldError>) -> Resp {
    json(
        status,
        &ErrorBody {
            error: msg.into(),
            errors,
        },
    )
}

fn apply_error(e: ApplyError) -> Resp {
    match e {
        ApplyError::Invalid(errors) => error(StatusCode::BAD_REQUEST, "invalid config", errors),
        ApplyError::BadTarget(m) => error(StatusCode::BAD_REQUEST, m, Vec::new()),
        e @ ApplyError::NoSuchVersion(_) => error(StatusCode::NOT_FOUND, e.to_string(), Vec::new()),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), Vec::new()),
    }
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn target_param(query: Option<&str>) -> Result<Option<Target>, String> {
    match query_param(query, "target") {
        None => Ok(None),
        Some(raw) => percent_decode(raw)
            .parse::<Target>()
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

/// Minimal `%XX` decoding for query values (targets are plain names in practice).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(b'%');
                    i += 1;
                }
            },
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `%`-encode a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What `method path` needs: nothing for `/healthz`, `config:write` for every `POST` (apply,
/// rollback, and unknown ones), any authenticated identity otherwise.
pub fn required(method: &Method, path: &str) -> Required {
    match (method, path) {
        (&Method::GET, "/healthz") => Required::Nothing,
        (&Method::GET | &Method::HEAD, _) => Required::Authenticated,
        _ => Required::Scope(Scope::ConfigWrite),
    }
}

use crate::http_server::Conn;
use crate::ratelimit::{self, Api, RequestLimiter};

/// 429 with `retry-after` and the API's JSON error shape.
fn too_many_requests(l: &ratelimit::Limited) -> Resp {
    let body = serde_json::json!({
        "error": format!("rate limit exceeded: retry in {} s", l.retry_after_secs()),
        "errors": []
    });
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, l.retry_after_secs().into());
    r
}

async fn handle(
    cp: Arc<ControlPlane>,
    auth: Arc<Authenticator>,
    limiter: Arc<RequestLimiter>,
    conn: Conn,
    req: hyper::Request<Incoming>,
) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Health probes are never limited; everything else is, before authentication.
    if path != "/healthz"
        && let Err(l) = limiter.check(Api::Http, Some(conn.remote.ip()))
    {
        return too_many_requests(&l);
    }
    if let Err(denied) = auth.http(
        req.headers(),
        conn.certs.as_deref().map(|c| c.as_slice()),
        required(&method, &path),
        &format!("{method} {path}"),
    ) {
        return denied.to_http();
    }
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok\n")));
            *r.status_mut() = StatusCode::OK;
            r
        }
        (&Method::GET, "/metrics") => {
            let mut r = hyper::Response::new(Full::new(Bytes::from(cp.metrics.render())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/v1/status") => json(
            StatusCode::OK,
            &Status {
                config_version: cp.operator.latest_version(),
                report: cp.status.report(),
            },
        ),
        (&Method::GET, "/v1/history") => json(StatusCode::OK, &cp.operator.history()),
        (&Method::GET, "/v1/ca/bundle") => match cp.ca.bundle_pem() {
            Some(pem) => {
                let mut r = hyper::Response::new(Full::new(Bytes::from(pem)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-pem-file"),
                );
                r
            }
            None => error(StatusCode::NOT_FOUND, "the mesh CA is disabled", Vec::new()),
        },
        (&Method::GET, "/v1/config") => {
            let filter = match target_param(query) {
                Ok(t) => t,
                Err(e) => return error(StatusCode::BAD_REQUEST, e, Vec::new()),
            };
            let targets: Vec<serde_json::Value> = cp
                .operator
                .current()
                .into_iter()
                .filter(|(t, _, _)| filter.as_ref().is_none_or(|f| f == t))
                .map(|(t, v, res)| {
                    serde_json::json!({
                        "target": t.to_string(),
                        "version": v,
                        "document": crate::validate::render_document(&v.to_string(), &res),
                    })
                })
                .collect();
            json(StatusCode::OK, &serde_json::json!({ "targets": targets }))
        }
        (&Method::POST, "/v1/config") => {
            let target = match target_param(query) {
                Ok(t) => t.unwrap_or(Target::All),
                Err(e) => return error(StatusCode::BAD_REQUEST, e, Vec::new()),
            };
            let origin = query_param(query, "origin")
                .map(percent_decode)
                .unwrap_or_else(|| "api".into());
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("reading the body: {e}"),
                        Vec::new(),
                    );
                }
            };
            let Ok(text) = String::from_utf8(body.to_vec()) else {
                return error(StatusCode::BAD_REQUEST, "the body is not UTF-8", Vec::new());
            };
            let cp2 = cp.clone();
            match tokio::task::spawn_blocking(move || cp2.apply_text(target, &text, &origin)).await
            {
                Ok(Ok(info)) => json(StatusCode::OK, &info),
                Ok(Err(e)) => apply_error(e),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("apply task: {e}"),
                    Vec::new(),
                ),
            }
        }
        (&Method::POST, p) if p.starts_with("/v1/rollback/") => {
            let Ok(version) = p["/v1/rollback/".len()..].parse::<u64>() else {
                return error(StatusCode::BAD_REQUEST, "bad version number", Vec::new());
            };
            let cp2 = cp.clone();
            match tokio::task::spawn_blocking(move || cp2.rollback(version)).await {
                Ok(Ok(info)) => json(StatusCode::OK, &info),
                Ok(Err(e)) => apply_error(e),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("rollback task: {e}"),
                    Vec::new(),
                ),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
            Vec::new(),
        ),
    }
}

/// Serve the API on `listener` until `shutdown` is cancelled, open and without TLS (see
/// [`serve_with`]).
pub async fn serve(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    serve_with(
        cp,
        listener,
        Arc::new(Authenticator::open()),
        Arc::new(RequestLimiter::unlimited()),
        None,
        shutdown,
    )
    .await
}

/// Serve the API on `listener`, checking requests with `auth`, over TLS with `tls`, until
/// `shutdown` is cancelled.
pub async fn serve_with(
    cp: Arc<ControlPlane>,
    listener: tokio::net::TcpListener,
    auth: Arc<Authenticator>,
    limiter: Arc<RequestLimiter>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    crate::http_server::serve("API", listener, tls, shutdown, move |req, conn| {
        handle(cp.clone(), auth.clone(), limiter.clone(), conn, req)
    })
    .await
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TLS to the server failed.
    #[error("TLS to {addr}: {source}")]
    Tls {
        /// The server.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Could not reach the server.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The server.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// HTTP failure.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// Building the request failed.
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The server refused.
    #[error("{}", render_error(.0))]
    Refused(ErrorBody),
    /// The answer is not what was expected.
    #[error("unexpected answer ({status}): {body}")]
    Unexpected {
        /// HTTP status.
        status: StatusCode,
        /// Body text.
        body: String,
    },
}

fn render_error(e: &ErrorBody) -> String {
    let mut s = e.error.clone();
    for fe in &e.errors {
        s.push_str("\n  ");
        s.push_str(&fe.to_string());
    }
    s
}

/// A client of the API at `addr` (`host:port`).
#[derive(Clone)]
pub struct Client {
    addr: String,
    authorization: Option<http::HeaderValue>,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("token", &self.authorization.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The host part of `host:port` / `[v6]:port`, as a TLS server name.
fn server_name(
    addr: &str,
) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, std::io::Error> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

impl Client {
    /// A client for `addr` (plain HTTP, no credentials).
    pub fn new(addr: impl Into<String>) -> Self {
        Client {
            addr: addr.into(),
            authorization: None,
            tls: None,
        }
    }

    /// Send a bearer token.
    pub fn with_token(self, token: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {token}"))?;
        v.set_sensitive(true);
        Ok(self.with_authorization(v))
    }

    /// Send this `authorization` header value.
    pub fn with_authorization(mut self, mut value: http::HeaderValue) -> Self {
        value.set_sensitive(true);
        self.authorization = Some(value);
        self
    }

    /// Connect over TLS with `config`.
    pub fn with_tls(mut self, config: Arc<tokio_rustls::rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    async fn send<IO>(
        &self,
        io: IO,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), ClientError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let conn = tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        Ok((status, body))
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        // The request's head and body go out in separate writes: no Nagle delay between them.
        let _ = stream.set_nodelay(true);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, self.addr.as_str());
        if let Some(v) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, v.clone());
        }
        let req = req.body(Full::new(body))?;
        match &self.tls {
            None => self.send(stream, req).await,
            Some(config) => {
                let tls_err = |source| ClientError::Tls {
                    addr: self.addr.clone(),
                    source,
                };
                let name = server_name(&self.addr).map_err(tls_err)?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(tls_err)?;
                self.send(stream, req).await
            }
        }
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let (status, body) = self.call(method, path_and_query, body).await?;
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|_| ClientError::Unexpected {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => Err(ClientError::Refused(e)),
                Err(_) => Err(ClientError::Unexpected {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                }),
            }
        }
    }

    /// Apply a document to `target`.
    pub async fn apply(
        &self,
        target: &Target,
        document: String,
    ) -> Result<VersionInfo, ClientError> {
        let path = format!("/v1/config?target={}", percent_encode(&target.to_string()));
        self.call_json(Method::POST, &path, Bytes::from(document))
            .await
    }

    /// The documents in force (all targets, or one).
    pub async fn get(&self, target: Option<&Target>) -> Result<serde_json::Value, ClientError> {
        let path = match target {
            Some(t) => format!("/v1/config?target={}", percent_encode(&t.to_string())),
            None => "/v1/config".into(),
        };
        self.call_json(Method::GET, &path, Bytes::new()).await
    }

    /// Every applied version.
    pub async fn history(&self) -> Result<Vec<VersionInfo>, ClientError> {
        self.call_json(Method::GET, "/v1/history", Bytes::new())
            .await
    }

    /// Re-apply `version` as a new version.
    pub async fn rollback(&self, version: u64) -> Result<VersionInfo, ClientError> {
        self.call_json(
            Method::POST,
            &format!("/v1/rollback/{version}"),
            Bytes::new(),
        )
        .await
    }

    /// Connected proxies and NACKs.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call_json(Method::GET, "/v1/status", Bytes::new())
            .await
    }

    /// The mesh CA's trust bundle (PEM).
    pub async fn ca_bundle(&self) -> Result<String, ClientError> {
        let (status, body) = self
            .call(Method::GET, "/v1/ca/bundle", Bytes::new())
            .await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(ClientError::Unexpected { status, body: text })
        }
    }

    /// The Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let (status, body) = self.call(Method::GET, "/metrics", Bytes::new()).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(ClientError::Unexpected { status, body: text })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_coding() {
        assert_eq!(
            query_param(Some("a=1&target=cluster%3Ax"), "target"),
            Some("cluster%3Ax")
        );
        assert_eq!(percent_decode("cluster%3Ax%20y"), "cluster:x y");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_encode("cluster:a b/c"), "cluster:a%20b%2Fc");
        assert_eq!(percent_decode(&percent_encode("node:ü&=")), "node:ü&=");
        assert_eq!(query_param(None, "x"), None);
        assert_eq!(query_param(Some("x"), "x"), Some(""));
    }
}
