//! Compiled route tables (Envoy `RouteConfiguration`): virtual host selection by domain,
//! route matching, cluster selection, rewrites, redirects, direct responses and header
//! mutations. Pure and synchronous: unit-tested exhaustively, benchmarked in `benches/`.
//!
//! # Layout
//! - this file: the public API and the per-request lookups (virtual host, route);
//! - `translate`: `RouteConfiguration` -> [`RouteTable`] (validation, field paths);
//! - `matcher`: path / header / query / gRPC matchers, string matchers, regexes;
//! - `action`: [`ForwardAction`], [`RedirectAction`], [`DirectResponse`], path rewrites;
//! - [`hash`]: the route `hash_policy` (request hash for RING_HASH / MAGLEV clusters);
//! - `header`: header mutations and Envoy command operators in header values.
//!
//! # API (used by `http::router`)
//! ```text
//! RouteTable::translate(rc, path, ctx, errs) -> RouteTable
//! RouteTable::route(&self, &RouteRequest) -> Option<RouteMatch<'_>>
//! RouteMatch::action() -> &RouteAction            // Forward / Redirect / Direct
//! RouteMatch::route_name() / vhost_name() -> &str
//! RouteMatch::apply_request_headers(&mut HeaderMap, &HeaderContext)
//! RouteMatch::apply_response_headers(&mut HeaderMap, &HeaderContext)
//! RouteMatch::rewrite_path(path_and_query) -> Option<String>
//! RouteMatch::redirect(&RouteRequest) -> Option<(StatusCode, String)>
//! ForwardAction::select_cluster(&HeaderMap, random) -> Option<Cow<str>>
//! ForwardAction::hash(&HeaderMap, query, remote_ip) -> HashOutcome   // hash_policy
//! ForwardAction::{timeout, idle_timeout, host_rewrite_literal(), auto_host_rewrite(),
//!                 connect_terminate()}
//! DirectResponse { status, body }
//! ```
//!
//! # Semantics (Envoy's, except where noted)
//! - **Virtual host selection**: the authority is lowercased, then looked up as an exact
//!   domain, then the longest `*suffix` wildcard, then the longest `prefix*` wildcard (a
//!   wildcard matches at least one character). If nothing matched and the authority has a
//!   port, the same lookup is retried without the port (Envoy does this in the connection
//!   manager with `strip_any_host_port`; weir always does it). Finally `*`. With
//!   `ignore_port_in_host_matching` the port is stripped before the first lookup.
//! - **Routes** are tried in order; the first whose path specifier, `headers`,
//!   `query_parameters` and `grpc` all match wins. Paths are matched without query string
//!   and fragment; `case_sensitive` (default true) applies to `prefix`, `path` and
//!   `path_separated_prefix`, never to `safe_regex` (full-string match).
//! - **CONNECT**: CONNECT requests match only `connect_matcher` routes, and those match only
//!   CONNECT requests (path specifiers never apply to CONNECT); `headers` still apply and the
//!   virtual host is chosen by the CONNECT authority (`host:port`).
//! - **Header matchers** see the request pseudo-headers `:authority`, `:path` (with query),
//!   `:method` and `:scheme`; several values of one header are joined with `,`.
//! - **Query parameters** are `&`-separated, percent-decoded (`+` is a space); the first
//!   value of a name is matched. `present_match: false` means "present", as in Envoy.
//! - **Header mutations** apply route, then virtual host, then route configuration
//!   (reversed with `most_specific_header_mutations_wins`); at each level removals come
//!   first, then overwrites, then appends, all decided against the headers as they were
//!   after that level's removals.
//! - **Redirects** build `Location` as Envoy's `Http::Utility::newUri`, with the request
//!   scheme taken from [`RouteRequest::scheme`] (the connection manager's view, not a
//!   client-supplied `x-forwarded-proto`).
//!
//! # Supported config (anything else set is an error naming its field path)
//! - `RouteConfiguration`: `name`, `virtual_hosts`, `{request,response}_headers_to_{add,remove}`,
//!   `validate_clusters` (default true: unknown `cluster` / weighted `name` is an error;
//!   `cluster_header` is not checked), `max_direct_response_body_size_bytes` (default 4096),
//!   `most_specific_header_mutations_wins`, `ignore_port_in_host_matching`, `metadata`.
//! - `VirtualHost`: `name` (unique), `domains` (unique across virtual hosts), `routes`, header
//!   mutations, `metadata`, `typed_per_filter_config`, `rate_limits`. `require_tls` other than
//!   `NONE` is rejected.
//! - `Route`: `name`, `match`, `route` / `redirect` / `direct_response`, header mutations,
//!   `metadata`, `typed_per_filter_config` (see [`filters`]: parsed by the filter's factory;
//!   a `FilterConfig` wrapper may disable or enable a filter per route).
//! - `RouteMatch`: `prefix`, `path`, `safe_regex`, `path_separated_prefix`, `connect_matcher`,
//!   `case_sensitive`, `headers` (`string_match`, `present_match`, the deprecated `exact_match` /
//!   `prefix_match` / `suffix_match` / `contains_match` / `safe_regex_match`,
//!   `invert_match`, `treat_missing_header_as_empty`), `query_parameters`, `grpc`.
//! - `RouteAction`: `cluster`, `cluster_header`, `weighted_clusters` (`name` or
//!   `cluster_header`, `weight`; `total_weight` must equal the sum), `timeout` (default 15 s,
//!   `0s` disables), `idle_timeout`, `prefix_rewrite`, `regex_rewrite`,
//!   `host_rewrite_literal`, `auto_host_rewrite`, `rate_limits`, `include_vh_rate_limits`,
//!   `upgrade_configs` (only `upgrade_type:
//!   CONNECT` with an empty `connect_config`: weir terminates CONNECT; a `connect_matcher`
//!   route that forwards must set it, since forwarding CONNECT to an upstream proxy is not
//!   supported), `hash_policy` (`header`, `cookie`, `connection_properties.source_ip`,
//!   `query_parameter`, `terminal`; see [`hash`]).
//! - `RedirectAction`: every field except `path_rewrite`. `DirectResponseAction`: `status`
//!   (100..=599), `body` (`inline_string`, `inline_bytes`, `filename` read at translation).
//! - Regexes compile with a program size limit ([`REGEX_SIZE_LIMIT`] bytes), so a hostile
//!   pattern fails translation instead of using unbounded memory.

mod action;
pub mod filters;
pub mod hash;
mod header;
mod matcher;
pub mod rds;
pub mod retry;
#[cfg(test)]
mod tests;
mod translate;

pub use rds::{RdsRegistry, RouteHandle};

use std::collections::HashMap;
use std::net::SocketAddr;

use http::{HeaderMap, Method, StatusCode};

pub use matcher::REGEX_SIZE_LIMIT;

pub use action::{
    DEFAULT_MAX_DIRECT_RESPONSE_BODY, DEFAULT_TIMEOUT, DirectResponse, ForwardAction,
    RedirectAction,
};
use header::HeaderMutations;
use matcher::RouteMatcher;

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

/// What header value command operators (`%DOWNSTREAM_REMOTE_ADDRESS%`, ...) read.
#[derive(Debug, Clone, Copy)]
pub struct HeaderContext {
    /// Downstream peer address (`%DOWNSTREAM_REMOTE_ADDRESS%`).
    pub downstream_remote: SocketAddr,
    /// Local address the downstream connection was accepted on
    /// (`%DOWNSTREAM_LOCAL_ADDRESS%`).
    pub downstream_local: SocketAddr,
    /// `%PROTOCOL%`: `"HTTP/1.1"` or `"HTTP/2"`.
    pub protocol: &'static str,
}

/// A compiled route.
#[derive(Debug)]
struct Route {
    name: String,
    matcher: RouteMatcher,
    action: RouteAction,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    /// `per_request_buffer_limit_bytes`.
    per_request_buffer_limit: Option<u32>,
    /// `typed_per_filter_config` (route-level `rate_limits` are on the forward action).
    filters: weir_filters::RouteFilterData,
    /// `decorator`: names the request's span (tracing).
    decorator: Option<Decorator>,
}

/// A route's `decorator`.
#[derive(Debug, Clone)]
pub struct Decorator {
    /// `operation`: the span name.
    pub operation: Box<str>,
    /// `propagate` (default true): the operation is sent upstream in
    /// `x-envoy-decorator-operation`.
    pub propagate: bool,
    /// `operation` as a header value (checked at translation).
    pub header: http::HeaderValue,
}

/// A compiled virtual host.
#[derive(Debug)]
struct VirtualHost {
    name: String,
    routes: Vec<Route>,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    policy: retry::VhostPolicy,
    /// `typed_per_filter_config` and `rate_limits`.
    filters: weir_filters::RouteFilterData,
}

/// Wildcard domains of one length: `(length, lowercased suffix-or-prefix -> vhost index)`.
type WildcardBucket = (usize, HashMap<Box<str>, usize>);

/// A compiled `RouteConfiguration`. Immutable once translated.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// `name`.
    pub name: String,
    vhosts: Vec<VirtualHost>,
    /// Lowercased exact domains -> index into `vhosts`.
    exact: HashMap<Box<str>, usize>,
    /// `*suffix` domains, longest first.
    suffixes: Vec<WildcardBucket>,
    /// `prefix*` domains, longest first.
    prefixes: Vec<WildcardBucket>,
    /// The `*` virtual host.
    default: Option<usize>,
    ignore_port: bool,
    most_specific_wins: bool,
    request_headers: HeaderMutations,
    response_headers: HeaderMutations,
    /// Every parsed `typed_per_filter_config` entry (for the connection manager's check).
    filter_configs: Vec<filters::FilterConfigUse>,
}

/// Envoy's `HeaderUtility::getPortStart`: where `:port` starts in an authority, if it has one.
fn port_start(authority: &str) -> Option<usize> {
    let i = authority.rfind(':')?;
    let host = &authority[..i];
    // A bare IPv6 address (`::1`) has colons but no port.
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return None;
    }
    let port = &authority[i + 1..];
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(i)
}

/// Run `f` on the ASCII-lowercased `s`, without allocating for ordinary host lengths.
fn with_lowercase<R>(s: &str, f: impl FnOnce(&str) -> R) -> R {
    if !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return f(s);
    }
    let mut buf = [0u8; 256];
    if let Some(dst) = buf.get_mut(..s.len()) {
        dst.copy_from_slice(s.as_bytes());
        dst.make_ascii_lowercase();
        // ASCII lowercasing keeps UTF-8 valid.
        if let Ok(l) = std::str::from_utf8(dst) {
            return f(l);
        }
    }
    f(&s.to_ascii_lowercase())
}

impl RouteTable {
    /// Translate and validate; errors go to `errs` with paths under `path`.
    pub fn translate(
        rc: &weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration,
        path: &str,
        ctx: &crate::config::TranslateCtx<'_>,
        errs: &mut crate::config::Errors,
    ) -> RouteTable {
        translate::route_table(rc, path, ctx, errs)
    }

    /// Exact, then longest suffix wildcard, then longest prefix wildcard (not `*`).
    fn find_domain(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        for (len, m) in &self.suffixes {
            if *len < host.len()
                && let Some(&i) = host.get(host.len() - len..).and_then(|s| m.get(s))
            {
                return Some(i);
            }
        }
        for (len, m) in &self.prefixes {
            if *len < host.len()
                && let Some(&i) = host.get(..*len).and_then(|s| m.get(s))
            {
                return Some(i);
            }
        }
        None
    }

    fn find_vhost(&self, authority: &str) -> Option<&VirtualHost> {
        let idx = with_lowercase(authority, |host| {
            let port = port_start(host);
            let host = match port {
                Some(p) if self.ignore_port => &host[..p],
                _ => host,
            };
            self.find_domain(host)
                .or_else(|| match port {
                    Some(p) if !self.ignore_port => self.find_domain(&host[..p]),
                    _ => None,
                })
                .or(self.default)
        })?;
        self.vhosts.get(idx)
    }

    /// Select the virtual host and route for a request; `None` when no virtual host or no
    /// route matches (Envoy answers 404 then).
    pub fn route<'a>(&'a self, req: &RouteRequest<'_>) -> Option<RouteMatch<'a>> {
        let vhost = self.find_vhost(req.authority)?;
        let route = vhost.routes.iter().find(|r| r.matcher.matches(req))?;
        Some(RouteMatch {
            table: self,
            vhost,
            route,
        })
    }

    /// The `typed_per_filter_config` entries of this table (name, type URL, path).
    pub fn filter_configs(&self) -> &[filters::FilterConfigUse] {
        &self.filter_configs
    }

    /// Number of virtual hosts.
    pub fn virtual_host_count(&self) -> usize {
        self.vhosts.len()
    }
}

/// A selected route: the table, virtual host and route a request matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    table: &'a RouteTable,
    vhost: &'a VirtualHost,
    route: &'a Route,
}

impl<'a> RouteMatch<'a> {
    /// What to do with the request.
    pub fn action(&self) -> &'a RouteAction {
        &self.route.action
    }

    /// The route's `name` (may be empty).
    pub fn route_name(&self) -> &'a str {
        &self.route.name
    }

    /// The route's `decorator`.
    pub fn decorator(&self) -> Option<&'a Decorator> {
        self.route.decorator.as_ref()
    }

    /// The virtual host's `name`.
    pub fn vhost_name(&self) -> &'a str {
        &self.vhost.name
    }

    /// The retry policy in force: the route's, else the virtual host's.
    pub fn retry_policy(&self) -> Option<&'a retry::RetryPolicy> {
        match &self.route.action {
            RouteAction::Forward(f) if f.policy.retry.is_some() => f.policy.retry.as_ref(),
            _ => self.vhost.policy.retry.as_ref(),
        }
    }

    /// The mirror policies in force: the route's, else the virtual host's.
    pub fn mirror_policies(&self) -> &'a [retry::MirrorPolicy] {
        match &self.route.action {
            RouteAction::Forward(f) if !f.policy.mirrors.is_empty() => &f.policy.mirrors,
            _ => &self.vhost.policy.mirrors,
        }
    }

    /// `include_request_attempt_count` of the virtual host.
    pub fn include_request_attempt_count(&self) -> bool {
        self.vhost.policy.include_request_attempt_count
    }

    /// `include_attempt_count_in_response` of the virtual host.
    pub fn include_attempt_count_in_response(&self) -> bool {
        self.vhost.policy.include_attempt_count_in_response
    }

    /// `per_request_buffer_limit_bytes` of the route, else the virtual host's.
    pub fn per_request_buffer_limit(&self) -> Option<u32> {
        self.route
            .per_request_buffer_limit
            .or(self.vhost.policy.per_request_buffer_limit)
    }

    /// What HTTP filters see of this route: per-filter configs of route and virtual host,
    /// and the rate limit actions.
    pub fn filter_view(&self) -> weir_filters::RouteView<'a> {
        let (route_rate_limits, include_vh_rate_limits) = match &self.route.action {
            RouteAction::Forward(f) => (f.rate_limits.as_slice(), f.include_vh_rate_limits),
            _ => (&[][..], false),
        };
        weir_filters::RouteView {
            route_name: &self.route.name,
            route: &self.route.filters,
            vhost: &self.vhost.filters,
            route_rate_limits,
            include_vh_rate_limits,
        }
    }

    fn apply(
        &self,
        levels: [&'a HeaderMutations; 3],
        headers: &mut HeaderMap,
        ctx: &HeaderContext,
    ) {
        if self.table.most_specific_wins {
            for l in levels.iter().rev() {
                l.apply(headers, ctx);
            }
        } else {
            for l in levels {
                l.apply(headers, ctx);
            }
        }
    }

    /// Apply `request_headers_to_add/_remove` of route, virtual host and table (Envoy order).
    pub fn apply_request_headers(&self, headers: &mut HeaderMap, ctx: &HeaderContext) {
        let levels = [
            &self.route.request_headers,
            &self.vhost.request_headers,
            &self.table.request_headers,
        ];
        self.apply(levels, headers, ctx);
    }

    /// Apply `response_headers_to_add/_remove` of route, virtual host and table (Envoy
    /// order). Also for redirects and direct responses, as Envoy does.
    pub fn apply_response_headers(&self, headers: &mut HeaderMap, ctx: &HeaderContext) {
        let levels = [
            &self.route.response_headers,
            &self.vhost.response_headers,
            &self.table.response_headers,
        ];
        self.apply(levels, headers, ctx);
    }

    /// The path-and-query to send upstream when the forward action rewrites it
    /// (`prefix_rewrite` replaces what the path specifier matched: the prefix, the path, or the
    /// whole path for `safe_regex`; `regex_rewrite` works on the path and keeps the query).
    /// `None` when nothing is rewritten (or the action is not a forward).
    pub fn rewrite_path(&self, path_and_query: &str) -> Option<String> {
        let RouteAction::Forward(f) = &self.route.action else {
            return None;
        };
        let rw = f.rewrite.as_ref()?;
        let matched = self.route.matcher.matched_len(path_and_query)?;
        rw.apply(path_and_query, matched)
    }

    /// For redirect routes: the status and `Location` for this request.
    pub fn redirect(&self, req: &RouteRequest<'_>) -> Option<(StatusCode, String)> {
        let RouteAction::Redirect(r) = &self.route.action else {
            return None;
        };
        let matched = self.route.matcher.matched_len(req.path);
        Some((r.status(), r.location(req, matched)))
    }
}

/// Route action.
#[derive(Debug)]
pub enum RouteAction {
    /// Forward upstream.
    Forward(ForwardAction),
    /// Answer with a redirect (see [`RouteMatch::redirect`]).
    Redirect(RedirectAction),
    /// Answer directly.
    Direct(DirectResponse),
}
