//! The admin server: Envoy's admin paths on `admin.address`.
//!
//! # Layout
//! - this file: the accept loop ([`serve`]), request dispatch, the endpoint index, method
//!   rules (mutations need `POST`, as in Envoy) and the small helpers every handler shares.
//! - [`lifecycle`](self::lifecycle): `/ready`, `/server_info`, `/stats`, `/stats/prometheus` and the
//!   mutating lifecycle endpoints (`/healthcheck/*`, `/drain_listeners`, `/quitquitquit`).
//! - [`config_dump`](self::config_dump): `/config_dump`, built from Envoy's real
//!   `envoy.admin.v3.*ConfigDump` messages so the JSON has Envoy's exact shape.
//! - [`clusters`](self::clusters): `/clusters` and `/listeners`, text and JSON.
//!
//! The admin server runs on the main runtime and keeps serving while listeners drain, so
//! operators can watch a drain; it stops when `hard_stop` fires.

mod clusters;
mod config_dump;
mod lifecycle;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::task::TaskTracker;

use crate::server::ServerState;

/// A client must send its request headers within this time or the connection is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head the admin server buffers (admin requests are tiny).
const MAX_BUF_SIZE: usize = 64 * 1024;
/// How long open admin connections get to finish their response once `hard_stop` fired.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Response body type of every admin handler.
type Body = Full<Bytes>;

const TEXT: &str = "text/plain; charset=UTF-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4";

/// One admin endpoint: path, help text, whether it mutates (and so requires `POST`).
struct Endpoint {
    path: &'static str,
    help: &'static str,
    mutates: bool,
}

/// Every endpoint, sorted by path (the index prints them in this order).
const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/",
        help: "Admin home page (this index)",
        mutates: false,
    },
    Endpoint {
        path: "/certs",
        help: "print certificate info (TLS contexts)",
        mutates: false,
    },
    Endpoint {
        path: "/clusters",
        help: "upstream cluster status (?format=json)",
        mutates: false,
    },
    Endpoint {
        path: "/config_dump",
        help: "dump current configs (?resource=FIELD, ?mask=a.b,c)",
        mutates: false,
    },
    Endpoint {
        path: "/drain_listeners",
        help: "drain listeners (?graceful accepted)",
        mutates: true,
    },
    Endpoint {
        path: "/healthcheck/fail",
        help: "cause the server to fail health checks",
        mutates: true,
    },
    Endpoint {
        path: "/healthcheck/ok",
        help: "cause the server to pass health checks",
        mutates: true,
    },
    Endpoint {
        path: "/listeners",
        help: "print listener info (?format=json)",
        mutates: false,
    },
    Endpoint {
        path: "/quitquitquit",
        help: "exit the server",
        mutates: true,
    },
    Endpoint {
        path: "/ready",
        help: "print server state, return 200 if LIVE, otherwise return 503",
        mutates: false,
    },
    Endpoint {
        path: "/reopen_logs",
        help: "reopen access logs",
        mutates: true,
    },
    Endpoint {
        path: "/server_info",
        help: "print server version/status information",
        mutates: false,
    },
    Endpoint {
        path: "/stats",
        help: "print server stats (?format=json, ?filter=REGEX)",
        mutates: false,
    },
    Endpoint {
        path: "/stats/prometheus",
        help: "print server stats in prometheus format",
        mutates: false,
    },
];

/// Serve the admin API on `listener` until `state.admin_stop` (or `hard_stop`) fires.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ServerState>) {
    let conns = TaskTracker::new();
    loop {
        // `admin_stop` is a child of `hard_stop`; it also fires when a hot-restart child took
        // the admin socket over.
        let accepted = tokio::select! {
            _ = state.admin_stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::select! {
                    _ = state.admin_stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        conns.spawn(serve_connection(stream, state.clone()));
    }
    conns.close();
    conns.wait().await;
    tracing::debug!("admin server stopped");
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<ServerState>) {
    let stop = state.hard_stop.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        std::future::ready(Ok::<_, Infallible>(handle(&state, &req)))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            // Let a response in flight (e.g. `/quitquitquit`'s `OK`) reach the client.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "admin connection error");
    }
}

/// Route one request.
fn handle<B>(state: &ServerState, req: &Request<B>) -> Response<Body> {
    let path = req.uri().path();
    let query = Query::parse(req.uri().query());
    let Some(ep) = ENDPOINTS.iter().find(|e| e.path == path) else {
        return index(StatusCode::NOT_FOUND, "invalid path. admin commands are:\n");
    };
    if ep.mutates {
        if req.method() != Method::POST {
            return method_not_allowed(req.method(), "POST", "POST required.");
        }
    } else if !matches!(*req.method(), Method::GET | Method::HEAD | Method::POST) {
        // Envoy serves read-only endpoints to GET and POST alike.
        return method_not_allowed(req.method(), "GET, HEAD, POST", "GET required.");
    }
    match ep.path {
        "/" => index(StatusCode::OK, "admin commands are:\n"),
        "/certs" => json(StatusCode::OK, &crate::tls::admin::certs(state)),
        "/clusters" => clusters::clusters(state, &query),
        "/config_dump" => config_dump::config_dump(state, &query),
        "/listeners" => clusters::listeners(state, &query),
        "/ready" => lifecycle::ready(state),
        "/server_info" => lifecycle::server_info(state),
        "/stats" => lifecycle::stats(state, &query),
        "/stats/prometheus" => text(StatusCode::OK, PROMETHEUS, state.stats.render_prometheus()),
        "/healthcheck/fail" => lifecycle::healthcheck(state, false),
        "/healthcheck/ok" => lifecycle::healthcheck(state, true),
        "/drain_listeners" => lifecycle::drain_listeners(state, &query),
        "/quitquitquit" => lifecycle::quitquitquit(state),
        "/reopen_logs" => {
            crate::access_log::sink::reopen_all();
            text(StatusCode::OK, TEXT, "OK\n")
        }
        _ => index(StatusCode::NOT_FOUND, "invalid path. admin commands are:\n"),
    }
}

/// The endpoint index (`GET /`, and the body of every 404).
fn index(status: StatusCode, heading: &str) -> Response<Body> {
    let mut out = String::from(heading);
    for e in ENDPOINTS {
        let method = if e.mutates { " (POST)" } else { "" };
        out.push_str(&format!("  {}{}: {}\n", e.path, method, e.help));
    }
    text(status, TEXT, out)
}

fn method_not_allowed(method: &Method, allow: &'static str, what: &str) -> Response<Body> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        TEXT,
        format!("Method {method} not allowed, {what}\n"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// A response with `body` and `content_type` (and Envoy's admin cache headers).
fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, max-age=0"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Pretty-printed JSON (as Envoy's admin prints it), newline-terminated.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    // Serializing a `Value` cannot fail (its map keys are strings).
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    text(status, JSON, body)
}

/// Decoded query parameters, in order; `?flag` has an empty value.
#[derive(Debug, Default)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let decode = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            q.unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `?format=json`.
    fn wants_json(&self) -> bool {
        self.get("format") == Some("json")
    }
}

/// Insert `key: value` into `obj` if it is an object that lacks `key`. Used where Envoy
/// prints a field that proto3 JSON would skip because it holds its default value.
fn fill(obj: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    if let serde_json::Value::Object(m) = obj {
        m.entry(key.to_string()).or_insert(value);
    }
}

#[cfg(test)]
mod tests;
