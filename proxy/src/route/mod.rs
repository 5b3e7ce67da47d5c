//! Compiled route tables (Envoy `RouteConfiguration`): virtual host selection by domain,
//! route matching, cluster selection, rewrites, redirects, direct responses and header
//! mutations. Pure and synchronous: unit-tested exhaustively, benchmarked in `benches/`.
//!
//! OWNER: route helper. Interface used by `http::router` (keep these signatures).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;

use crate::config::{Errors, TranslateCtx};

/// The request attributes routing looks at.
#[derive(Debug)]
pub struct RouteRequest<'a> {
    /// `:authority` / `Host`, as received (may include a port).
    pub authority: &'a str,
    /// Path and query, already normalized by the connection manager when configured.
    pub path: &'a str,
    /// Method.
    pub method: &'a Method,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// `http` or `https` (for redirects and `x-forwarded-proto`).
    pub scheme: &'a str,
}

/// A compiled `RouteConfiguration`.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// `name`.
    pub name: String,
}

impl RouteTable {
    /// Translate and validate; errors go to `errs` with paths under `path`.
    pub fn translate(
        rc: &RouteConfiguration,
        path: &str,
        ctx: &TranslateCtx<'_>,
        errs: &mut Errors,
    ) -> RouteTable {
        let _ = (path, ctx, errs);
        RouteTable {
            name: rc.name.clone(),
        }
    }

    /// Select the virtual host and route for a request.
    pub fn route<'a>(&'a self, req: &RouteRequest<'_>) -> Option<RouteMatch<'a>> {
        let _ = req;
        None
    }
}

/// Values for header command operators.
#[derive(Debug, Clone, Copy)]
pub struct HeaderContext {
    /// Downstream remote address.
    pub downstream_remote: std::net::SocketAddr,
    /// Downstream local address.
    pub downstream_local: std::net::SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
}

/// A selected route.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    /// The table.
    pub table: &'a RouteTable,
    /// What to do.
    pub action: &'a RouteAction,
}

impl RouteMatch<'_> {
    /// The action.
    pub fn action(&self) -> &RouteAction {
        self.action
    }

    /// Route name.
    pub fn route_name(&self) -> &str {
        ""
    }

    /// Virtual host name.
    pub fn vhost_name(&self) -> &str {
        ""
    }

    /// Apply `request_headers_to_add/_remove` of route, virtual host and table (Envoy order).
    pub fn apply_request_headers(&self, headers: &mut HeaderMap, ctx: &HeaderContext) {
        let _ = (headers, ctx);
    }

    /// Apply `response_headers_to_add/_remove` of route, virtual host and table.
    pub fn apply_response_headers(&self, headers: &mut HeaderMap, ctx: &HeaderContext) {
        let _ = (headers, ctx);
    }

    /// Rewritten path-and-query, if the route rewrites.
    pub fn rewrite_path(&self, path_and_query: &str) -> Option<String> {
        let _ = path_and_query;
        None
    }

    /// For redirect actions: status and Location.
    pub fn redirect(&self, req: &RouteRequest<'_>) -> Option<(StatusCode, String)> {
        match self.action {
            RouteAction::Redirect(r) => Some(r.response(req)),
            _ => None,
        }
    }
}

/// Route action.
#[derive(Debug)]
pub enum RouteAction {
    /// Forward upstream.
    Forward(ForwardAction),
    /// Answer with a redirect.
    Redirect(RedirectAction),
    /// Answer directly.
    Direct(DirectResponse),
}

/// `route` action.
#[derive(Debug, Default)]
pub struct ForwardAction {
    /// Upstream timeout for the whole response; `None` disables it (Envoy's `0s`). Default 15 s.
    pub timeout: Option<Duration>,
    /// Per-route stream idle timeout override.
    pub idle_timeout: Option<Duration>,
}

impl ForwardAction {
    /// The cluster to use: fixed, weighted (using `random`), or from a request header.
    /// `None` when `cluster_header` is absent from the request.
    pub fn select_cluster<'a>(
        &'a self,
        headers: &'a HeaderMap,
        random: u64,
    ) -> Option<Cow<'a, str>> {
        let _ = (headers, random);
        None
    }

    /// The new Host/authority: literal, or `None` for unchanged. `auto_host_rewrite` is
    /// signalled by [`ForwardAction::auto_host_rewrite`].
    pub fn host_rewrite_literal(&self) -> Option<&str> {
        None
    }

    /// Whether to rewrite Host to the chosen upstream host's address (STRICT_DNS hostname).
    pub fn auto_host_rewrite(&self) -> bool {
        false
    }
}

/// `redirect` action.
#[derive(Debug, Default)]
pub struct RedirectAction {}

impl RedirectAction {
    /// The status and `Location` for this request.
    pub fn response(&self, req: &RouteRequest<'_>) -> (StatusCode, String) {
        (
            StatusCode::MOVED_PERMANENTLY,
            format!("{}://{}{}", req.scheme, req.authority, req.path),
        )
    }
}

/// `direct_response` action.
#[derive(Debug)]
pub struct DirectResponse {
    /// Status.
    pub status: StatusCode,
    /// Body (inline string or bytes; files read at translation time).
    pub body: Option<Bytes>,
}
