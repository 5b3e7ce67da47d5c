//! # weir-filters
//!
//! weir's HTTP filter interface, the registry that maps an Envoy `typed_config` type URL to a
//! filter factory (as Envoy does with its extension names), and the built-in filters:
//!
//! - [`local_ratelimit`] — `envoy.filters.http.local_ratelimit` and the connection limiter
//!   of `envoy.filters.network.local_ratelimit`;
//! - [`fault`] — `envoy.filters.http.fault`;
//! - [`health_check`] — `envoy.filters.http.health_check`.
//!
//! Model (after Envoy's "config object vs per-stream filter"):
//! - a factory turns validated proto config into an immutable, shared [`HttpFilter`] once, at
//!   config-translation time; per-route `typed_per_filter_config` is parsed by the same factory
//!   into an `Arc<dyn Any>` the filter downcasts ([`HttpFilterFactory::create_route_config`]);
//! - per request the connection manager computes the route once, then runs the
//!   [`FilterChain`] with a [`StreamInfo`] (addresses, route, server health) and a per-filter
//!   [`FilterContext`] (the most specific per-route config, per-request state). A hook returns
//!   [`FilterAction::Continue`], stops the chain with a [`LocalReply`], or
//!   [`FilterAction::Pause`]s on a future (a fault delay) — boxed only when a filter pauses.
//! - Response hooks run in reverse order on every response (upstream or local) and may wrap
//!   the response body ([`HttpFilter::wrap_response_body`]).
//! - The router (`envoy.filters.http.router`) is terminal and lives in the proxy crate, since
//!   it needs the cluster manager.
#![forbid(unsafe_code)]

pub mod body;
pub mod chain;
pub mod config;
pub mod fault;
pub mod fetch;
pub mod health_check;
pub mod jwt_authn;
pub mod local_ratelimit;
pub mod matcher;
pub mod ratelimit;
pub mod rbac;
pub mod token_bucket;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use weir_xds_api::Any;

pub use body::{BoxBody, BoxError};
pub use chain::{
    ChainEntry, ChainState, ConnectionState, DownstreamTls, FilterChain, FilterContext, PeerCert,
    PerFilterConfig, PerFilterConfigs, RouteFilterData, RouteView, ServerInfo, StreamInfo,
};
pub use config::{ConfigErrors, FactoryContext, RequestHead, RequestMatcher, StatScope};
pub use ratelimit::{Descriptor, RateLimitPolicy};

/// Type URLs of the built-in filters.
pub mod type_urls {
    /// `envoy.filters.http.router`.
    pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
    /// `envoy.filters.http.local_ratelimit`.
    pub const LOCAL_RATELIMIT: &str =
        "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
    /// `envoy.filters.http.fault`.
    pub const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
    /// `envoy.filters.http.health_check`.
    pub const HEALTH_CHECK: &str =
        "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck";
    /// `envoy.filters.network.local_ratelimit`.
    pub const NETWORK_LOCAL_RATELIMIT: &str =
        "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit";
    /// `envoy.filters.http.rbac`.
    pub const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    /// `envoy.filters.network.rbac`.
    pub const NETWORK_RBAC: &str =
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
    /// `envoy.filters.http.jwt_authn`.
    pub const JWT_AUTHN: &str =
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
    /// `envoy.filters.http.rbac` per-route config.
    pub const RBAC_PER_ROUTE: &str =
        "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
    /// `envoy.filters.http.jwt_authn` per-route config.
    pub const JWT_AUTHN_PER_ROUTE: &str =
        "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";
    /// `envoy.config.route.v3.FilterConfig` (wrapper in `typed_per_filter_config`).
    pub const FILTER_CONFIG: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";
}

/// A future a paused filter waits on; its output decides how the chain goes on.
pub type PauseFuture = Pin<Box<dyn Future<Output = FilterAction> + Send>>;

/// What a filter hook decided.
pub enum FilterAction {
    /// Go on to the next filter.
    Continue,
    /// Stop the chain and answer the client with this reply.
    Respond(LocalReply),
    /// Wait for the future, then act on its output (which may pause again).
    Pause(PauseFuture),
    /// Wait for the future, then call the same filter's `on_request` again with the request
    /// (an async lookup, like a remote JWKS fetch, after which the filter decides and may
    /// modify the request). The filter must not retry forever (remember what it waited for in
    /// its per-request state).
    Retry(WaitFuture),
}

/// A future a filter waits on before it runs again ([`FilterAction::Retry`]).
pub type WaitFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl std::fmt::Debug for FilterAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterAction::Continue => f.write_str("Continue"),
            FilterAction::Respond(r) => f.debug_tuple("Respond").field(r).finish(),
            FilterAction::Pause(_) => f.write_str("Pause(..)"),
            FilterAction::Retry(_) => f.write_str("Retry(..)"),
        }
    }
}

/// A reply generated by the proxy itself (no route, rate limited, overflow, ...).
///
/// The connection manager renders it: as-is for HTTP, or as a gRPC error (HTTP 200 with
/// `grpc-status`) when the request was gRPC or `grpc_status` is set.
#[derive(Debug, Clone)]
pub struct LocalReply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body (text/plain).
    pub body: Bytes,
    /// Extra response headers.
    pub headers: HeaderMap,
    /// Envoy response flag for access logs and stats (`NR`, `UH`, `UF`, `UT`, ...).
    pub flag: &'static str,
    /// An explicit gRPC status (fault `grpc_status` abort); `None` maps `status` as Envoy does.
    pub grpc_status: Option<u32>,
    /// `%RESPONSE_CODE_DETAILS%` when it is not the one Envoy derives from `flag` (RBAC's
    /// `rbac_access_denied_matched_policy[<policy>]`).
    pub details: Option<String>,
}

impl LocalReply {
    /// A reply with a status, a body and an Envoy response flag.
    pub fn new(status: StatusCode, body: impl Into<Bytes>, flag: &'static str) -> Self {
        Self {
            status,
            body: body.into(),
            headers: HeaderMap::new(),
            flag,
            grpc_status: None,
            details: None,
        }
    }

    /// The same reply with explicit response code details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }
}

/// An HTTP filter: built once from config, shared by all streams and workers.
///
/// Hooks take `&self`; per-request state goes into [`FilterContext::set_state`].
pub trait HttpFilter: Send + Sync + std::fmt::Debug {
    /// The filter's kind (`envoy.filters.http.x`), for logs.
    fn name(&self) -> &str;
    /// Called with the request head after routing, before the router. Default: continue.
    fn on_request(
        &self,
        _req: &mut http::request::Parts,
        _ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        FilterAction::Continue
    }
    /// Called with the response head (upstream or local reply) on its way to the client.
    fn on_response(&self, _resp: &mut http::response::Parts, _ctx: &mut FilterContext<'_>) {}
    /// Wrap the response body (after `on_response`). Default: unchanged.
    fn wrap_response_body(&self, body: BoxBody, _ctx: &mut FilterContext<'_>) -> BoxBody {
        body
    }
}

/// A filter's config was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilterConfigError {
    /// No factory for this type URL.
    #[error("unsupported filter type {0}")]
    Unsupported(String),
    /// The config is invalid; `field` is the full field path.
    #[error("{field}: {message}")]
    Invalid {
        /// Field path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Builds a filter (and its per-route configs) from `typed_config`.
pub trait HttpFilterFactory: Send + Sync {
    /// The `typed_config` type URL this factory accepts.
    fn type_url(&self) -> &'static str;
    /// Whether this filter ends the chain (only the router).
    fn is_terminal(&self) -> bool {
        false
    }
    /// Validate and build; errors go to `errs` with paths under `path` (the `typed_config`).
    /// Terminal filters return `None`: the proxy handles them itself.
    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>>;
    /// The type URL of this filter's per-route config when it differs from
    /// [`HttpFilterFactory::type_url`] (`RBACPerRoute`, jwt_authn's `PerRouteConfig`).
    fn route_type_url(&self) -> Option<&'static str> {
        None
    }
    /// Parse a per-route (`typed_per_filter_config`) config. Default: not supported.
    fn create_route_config(
        &self,
        _config: &Any,
        path: &str,
        _ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        errs.add(path, "this filter has no per-route config");
        None
    }
}

/// Type URL -> factory, the one list naming all built-in HTTP filters.
#[derive(Default)]
pub struct Registry {
    http: HashMap<&'static str, Box<dyn HttpFilterFactory>>,
    /// Per-route config type URL -> the filter's type URL (when they differ).
    route: HashMap<&'static str, &'static str>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("http", &self.http.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The router's factory: validation only (the proxy runs the router itself).
struct RouterFactory;

impl HttpFilterFactory for RouterFactory {
    fn type_url(&self) -> &'static str {
        type_urls::ROUTER
    }
    fn is_terminal(&self) -> bool {
        true
    }
    fn create(
        &self,
        _config: &Any,
        _path: &str,
        _ctx: &dyn FactoryContext,
        _errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        None
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in filters: router, local_ratelimit, fault, health_check, rbac, jwt_authn.
    pub fn builtin() -> &'static Registry {
        static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        R.get_or_init(|| {
            let mut r = Registry::new();
            r.register_http(Box::new(RouterFactory));
            r.register_http(Box::new(local_ratelimit::Factory));
            r.register_http(Box::new(fault::Factory));
            r.register_http(Box::new(health_check::Factory));
            r.register_http(Box::new(rbac::Factory));
            r.register_http(Box::new(jwt_authn::Factory));
            r
        })
    }

    /// Add a factory (replacing any for the same type URL).
    pub fn register_http(&mut self, f: Box<dyn HttpFilterFactory>) {
        if let Some(r) = f.route_type_url() {
            self.route.insert(r, f.type_url());
        }
        self.http.insert(f.type_url(), f);
    }

    /// The factory that parses a `typed_per_filter_config` of this type URL: the filter's own
    /// config type, or its distinct per-route type.
    pub fn http_for_route(&self, type_url: &str) -> Option<&dyn HttpFilterFactory> {
        let filter = self.route.get(type_url).copied().unwrap_or(type_url);
        self.http(filter)
    }

    /// Look up the factory for a type URL.
    pub fn http(&self, type_url: &str) -> Option<&dyn HttpFilterFactory> {
        self.http.get(type_url).map(|b| b.as_ref())
    }

    /// The supported HTTP filter type URLs, sorted (for error messages).
    pub fn http_type_urls(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.http.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Test helpers: a filter that adds a header, for chain tests.
pub mod testing {
    use super::*;

    /// Adds `name: value` to every request and response.
    #[derive(Debug)]
    pub struct AddHeader {
        /// Header name.
        pub name: http::HeaderName,
        /// Header value.
        pub value: http::HeaderValue,
    }

    impl HttpFilter for AddHeader {
        fn name(&self) -> &str {
            "test.add_header"
        }
        fn on_request(
            &self,
            req: &mut http::request::Parts,
            _ctx: &mut FilterContext<'_>,
        ) -> FilterAction {
            req.headers.append(self.name.clone(), self.value.clone());
            FilterAction::Continue
        }
        fn on_response(&self, resp: &mut http::response::Parts, _ctx: &mut FilterContext<'_>) {
            resp.headers.append(self.name.clone(), self.value.clone());
        }
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    #[test]
    fn per_route_types_map_to_their_filter() {
        let r = Registry::builtin();
        for (route, filter) in [
            (type_urls::RBAC_PER_ROUTE, type_urls::RBAC),
            (type_urls::JWT_AUTHN_PER_ROUTE, type_urls::JWT_AUTHN),
            (type_urls::RBAC, type_urls::RBAC),
            (type_urls::FAULT, type_urls::FAULT),
        ] {
            let f = r.http_for_route(route).expect("factory");
            assert_eq!(f.type_url(), filter);
        }
        assert!(r.http_for_route("type.googleapis.com/x.Unknown").is_none());
        // A per-route type is not itself a filter type.
        assert!(r.http(type_urls::RBAC_PER_ROUTE).is_none());
    }
}
