//! The HTTP filter chain: what the connection manager runs per request.
//!
//! ```text
//! route = RouteTable::route(req)                  // once, before filters
//! info  = StreamInfo { addresses, is_grpc, route view, server health, rolls }
//! chain.decode(&mut parts, &info, &mut state)    // filters in order; Pause awaits
//!   -> Err(LocalReply) stops the chain; Retry(wait) awaits, then calls the filter again
//! ... router / 404 / local reply ...
//! chain.encode(response, &info, &mut state)      // on_response + wrap_response_body, reverse
//! ```
//!
//! Per filter, the most specific `typed_per_filter_config` (route over virtual host) is handed
//! to the filter as [`FilterContext::route_config`]. A filter `disabled` in the connection
//! manager runs only on routes whose per-filter config enables it; a per-route
//! `FilterConfig{disabled: true}` turns it off for that route.
//!
//! Cost when no filter is configured: nothing (the connection manager skips the chain). With
//! filters: no allocation unless a filter stores per-request state or pauses.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::RequestHead;
use crate::ratelimit::RateLimitPolicy;
use crate::{BoxBody, FilterAction, HttpFilter, LocalReply};

/// One route-level per-filter entry.
#[derive(Debug, Clone)]
pub enum PerFilterConfig {
    /// The filter's parsed config (downcast by the filter).
    Config(Arc<dyn Any + Send + Sync>),
    /// `FilterConfig{disabled: true}`: skip the filter on this route.
    Disabled,
    /// `FilterConfig{}` without config: enable a filter `disabled` in the connection manager.
    Enabled,
}

/// `typed_per_filter_config` of a route or virtual host, by filter config name.
#[derive(Debug, Clone, Default)]
pub struct PerFilterConfigs(pub Vec<(Box<str>, PerFilterConfig)>);

impl PerFilterConfigs {
    /// The entry for a filter name.
    pub fn get(&self, name: &str) -> Option<&PerFilterConfig> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, c)| c)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What filters need from a route or virtual host.
#[derive(Debug, Default)]
pub struct RouteFilterData {
    /// `typed_per_filter_config`.
    pub per_filter: PerFilterConfigs,
    /// `rate_limits` (virtual host level; the route's are on its forward action).
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// The matched route as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct RouteView<'a> {
    /// Route `name`.
    pub route_name: &'a str,
    /// Route-level data.
    pub route: &'a RouteFilterData,
    /// Virtual-host-level data.
    pub vhost: &'a RouteFilterData,
    /// `RouteAction.rate_limits` (empty for redirects and direct responses).
    pub route_rate_limits: &'a [RateLimitPolicy],
    /// `RouteAction.include_vh_rate_limits`.
    pub include_vh_rate_limits: bool,
}

impl<'a> RouteView<'a> {
    /// The most specific per-filter entry (route over virtual host).
    pub fn per_filter(&self, name: &str) -> Option<&'a PerFilterConfig> {
        self.route
            .per_filter
            .get(name)
            .or_else(|| self.vhost.per_filter.get(name))
    }
}

/// Server state filters read (implemented by the proxy).
pub trait ServerInfo: Send + Sync {
    /// `false` after `POST /healthcheck/fail` or while draining.
    fn healthy(&self) -> bool;
    /// `(healthy hosts, all hosts)` of a cluster; `None` when it does not exist.
    fn cluster_health(&self, name: &str) -> Option<(usize, usize)>;
    /// HTTP fetches through a named cluster (remote JWKS); `None` when the server has none.
    fn upstream_fetch(&self) -> Option<Arc<dyn crate::fetch::UpstreamFetch>> {
        None
    }
}

/// An always-healthy server without clusters (tests, tools).
#[derive(Debug, Default)]
pub struct HealthyServer;

impl ServerInfo for HealthyServer {
    fn healthy(&self) -> bool {
        true
    }
    fn cluster_health(&self, _name: &str) -> Option<(usize, usize)> {
        None
    }
}

/// Per-connection filter state (per-connection rate limit buckets), keyed by the owning
/// config's address. Locked only by the streams of one connection.
#[derive(Default)]
pub struct ConnectionState {
    slots: std::sync::Mutex<Vec<(usize, Arc<dyn Any + Send + Sync>)>>,
}

impl std::fmt::Debug for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionState")
    }
}

impl ConnectionState {
    /// The value for `key`, created by `make` on first use.
    pub fn get_or_insert_with<T: Any + Send + Sync>(
        &self,
        key: usize,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = slots
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.clone().downcast::<T>().ok())
        {
            return v;
        }
        let v = Arc::new(make());
        slots.retain(|(k, _)| *k != key);
        slots.push((key, v.clone()));
        v
    }
}

/// TLS facts of a downstream connection: what the TLS transport socket negotiated (or, for
/// TLS passthrough, what the `tls_inspector` saw in the ClientHello). Shared by the
/// connection's requests, RBAC, access logs, tracing and `x-forwarded-client-cert`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownstreamTls {
    /// SNI the client asked for.
    pub sni: Option<String>,
    /// ALPN protocol negotiated (terminated TLS) or offered first (passthrough).
    pub alpn: Option<Vec<u8>>,
    /// Whether weir terminated TLS (false: only inspected for passthrough).
    pub terminated: bool,
    /// Negotiated version, Envoy's spelling (`TLSv1.2`, `TLSv1.3`).
    pub version: Option<&'static str>,
    /// Negotiated cipher suite (IANA name).
    pub cipher: Option<String>,
    /// URI SANs of the certificate weir presented (its own SPIFFE ID in a mesh).
    pub local_uri_sans: Vec<String>,
    /// The validated client certificate, when the client presented one.
    pub peer: Option<PeerCert>,
}

/// Facts of a validated peer certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCert {
    /// URI SANs (a SPIFFE ID is one), in certificate order.
    pub uri_sans: Vec<String>,
    /// DNS SANs, in certificate order.
    pub dns_sans: Vec<String>,
    /// Subject distinguished name, RFC 2253 form.
    pub subject: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Hex SHA-256 of the DER certificate (XFCC `Hash`).
    pub sha256: String,
    /// The certificate, PEM (XFCC `Cert`, `%DOWNSTREAM_PEER_CERT%`).
    pub pem: String,
}

/// Per-request facts shared by all filters.
pub struct StreamInfo<'a> {
    /// Downstream client address after XFF trust evaluation.
    pub downstream_remote: SocketAddr,
    /// The connection's physical peer address (before XFF and the PROXY protocol); defaults
    /// to `downstream_remote`, set with [`StreamInfo::with_direct_remote`].
    pub direct_remote: SocketAddr,
    /// The connection's peer as the PROXY protocol restored it (before XFF; RBAC
    /// `source_ip`); defaults to `direct_remote`, set with [`StreamInfo::with_source_remote`].
    pub source_remote: SocketAddr,
    /// Local address the connection was accepted on.
    pub downstream_local: SocketAddr,
    /// Downstream connection id (per-connection rate limit buckets).
    pub connection_id: u64,
    /// Whether the request is gRPC.
    pub is_grpc: bool,
    /// `:authority` as routed.
    pub authority: &'a str,
    /// Path (normalized) with query, as routed.
    pub path: &'a str,
    /// `http` / `https`.
    pub scheme: &'a str,
    /// The route chosen before the filters ran.
    pub route: Option<RouteView<'a>>,
    /// Server health.
    pub server: &'a dyn ServerInfo,
    /// Per-connection filter state.
    pub connection: &'a ConnectionState,
    /// TLS facts of the downstream connection (`None` for plain text); set with
    /// [`StreamInfo::with_tls`].
    pub tls: Option<&'a DownstreamTls>,
    /// SplitMix64 state for [`StreamInfo::roll`].
    rng: AtomicU64,
    /// Facts filters report for access logs and tracing (health check, injected delay).
    marks: std::sync::atomic::AtomicU8,
}

/// [`StreamInfo::mark`] bits.
pub mod marks {
    /// The health check filter handled the request (`not_health_check_filter`).
    pub const HEALTH_CHECK: u8 = 1;
    /// The fault filter delayed the request (response flag `DI`).
    pub const DELAY_INJECTED: u8 = 2;
}

impl std::fmt::Debug for StreamInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamInfo")
            .field("downstream_remote", &self.downstream_remote)
            .field("path", &self.path)
            .field("route", &self.route.map(|r| r.route_name))
            .finish()
    }
}

impl<'a> StreamInfo<'a> {
    /// Facts for one request; `seed` drives [`StreamInfo::roll`] (random per request in the
    /// proxy, fixed in tests).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        downstream_remote: SocketAddr,
        downstream_local: SocketAddr,
        connection_id: u64,
        is_grpc: bool,
        authority: &'a str,
        path: &'a str,
        scheme: &'a str,
        route: Option<RouteView<'a>>,
        server: &'a dyn ServerInfo,
        connection: &'a ConnectionState,
        seed: u64,
    ) -> Self {
        Self {
            downstream_remote,
            direct_remote: downstream_remote,
            source_remote: downstream_remote,
            downstream_local,
            connection_id,
            is_grpc,
            authority,
            path,
            scheme,
            route,
            server,
            connection,
            tls: None,
            rng: AtomicU64::new(seed),
            marks: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// The downstream connection's TLS facts.
    pub fn with_tls(mut self, tls: Option<&'a DownstreamTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The connection's physical peer address (RBAC `direct_remote_ip`; also `source_ip`
    /// unless [`StreamInfo::with_source_remote`] says otherwise).
    pub fn with_direct_remote(mut self, peer: SocketAddr) -> Self {
        self.direct_remote = peer;
        self.source_remote = peer;
        self
    }

    /// The connection's peer after the PROXY protocol (RBAC `source_ip`).
    pub fn with_source_remote(mut self, peer: SocketAddr) -> Self {
        self.source_remote = peer;
        self
    }

    /// Record a fact for access logs / tracing ([`marks`] bits).
    pub fn mark(&self, bit: u8) {
        self.marks.fetch_or(bit, Ordering::Relaxed);
    }

    /// The recorded [`marks`] bits.
    pub fn marks(&self) -> u8 {
        self.marks.load(Ordering::Relaxed)
    }

    /// The next random value of this request (SplitMix64; deterministic for a seed).
    pub fn roll(&self) -> u64 {
        let s = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The request as matchers see it.
    pub fn head<'r>(&'r self, req: &'r http::request::Parts) -> RequestHead<'r> {
        RequestHead {
            authority: self.authority,
            path: self.path,
            method: &req.method,
            scheme: self.scheme,
            headers: &req.headers,
        }
    }
}

/// Per-request, per-filter state (allocated only when a filter stores some).
#[derive(Default)]
pub struct ChainState {
    slots: Vec<(usize, Box<dyn Any + Send>)>,
}

impl std::fmt::Debug for ChainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainState({} slots)", self.slots.len())
    }
}

/// What one filter sees of the request besides the headers.
pub struct FilterContext<'a> {
    /// Per-request facts.
    pub stream: &'a StreamInfo<'a>,
    /// The most specific per-route config for this filter, if any.
    pub route_config: Option<&'a (dyn Any + Send + Sync)>,
    state: &'a mut ChainState,
    index: usize,
}

impl<'a> FilterContext<'a> {
    /// Store per-request state for this filter (replacing any).
    pub fn set_state<T: Any + Send>(&mut self, v: T) {
        let idx = self.index;
        self.state.slots.retain(|(i, _)| *i != idx);
        self.state.slots.push((idx, Box::new(v)));
    }

    /// This filter's per-request state.
    pub fn state<T: Any + Send>(&mut self) -> Option<&mut T> {
        let idx = self.index;
        self.state
            .slots
            .iter_mut()
            .find(|(i, _)| *i == idx)
            .and_then(|(_, b)| b.downcast_mut::<T>())
    }

    /// Take this filter's per-request state out.
    pub fn take_state<T: Any + Send>(&mut self) -> Option<T> {
        let idx = self.index;
        let pos = self.state.slots.iter().position(|(i, _)| *i == idx)?;
        let (_, b) = self.state.slots.swap_remove(pos);
        b.downcast::<T>().ok().map(|b| *b)
    }

    /// The per-route config downcast to the filter's type.
    pub fn route_config_as<T: Any>(&self) -> Option<&'a T> {
        self.route_config.and_then(|c| c.downcast_ref::<T>())
    }
}

/// One configured filter.
#[derive(Debug, Clone)]
pub struct ChainEntry {
    /// The config name (`HttpFilter.name`), the key of `typed_per_filter_config`.
    pub name: String,
    /// The filter.
    pub filter: Arc<dyn HttpFilter>,
    /// `HttpFilter.disabled`: runs only where a route enables it.
    pub disabled: bool,
    /// The `typed_config` type URL (per-route configs under this name must match it).
    pub type_url: String,
}

/// The non-terminal HTTP filters of a connection manager, in order.
#[derive(Debug, Clone, Default)]
pub struct FilterChain {
    entries: Vec<ChainEntry>,
}

impl FilterChain {
    /// A chain of these filters.
    pub fn new(entries: Vec<ChainEntry>) -> Self {
        Self { entries }
    }

    /// Whether there are no filters (the connection manager then skips the chain).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of filters.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entries.
    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    /// Whether the filter runs for this request, and its per-route config.
    fn resolve<'a>(
        e: &ChainEntry,
        info: &StreamInfo<'a>,
    ) -> Option<Option<&'a (dyn Any + Send + Sync)>> {
        match info.route.and_then(|r| r.per_filter(&e.name)) {
            Some(PerFilterConfig::Disabled) => None,
            Some(PerFilterConfig::Config(c)) => Some(Some(c.as_ref())),
            Some(PerFilterConfig::Enabled) => Some(None),
            None if e.disabled => None,
            None => Some(None),
        }
    }

    /// Run the request hooks in order. `Err` is the local reply that stopped the chain.
    pub async fn decode<'a>(
        &self,
        req: &mut http::request::Parts,
        info: &'a StreamInfo<'a>,
        state: &mut ChainState,
    ) -> Result<(), LocalReply> {
        for (index, e) in self.entries.iter().enumerate() {
            let Some(route_config) = Self::resolve(e, info) else {
                continue;
            };
            let mut ctx = FilterContext {
                stream: info,
                route_config,
                state,
                index,
            };
            let mut action = e.filter.on_request(req, &mut ctx);
            loop {
                match action {
                    FilterAction::Continue => break,
                    FilterAction::Respond(r) => return Err(r),
                    FilterAction::Pause(f) => action = f.await,
                    FilterAction::Retry(f) => {
                        f.await;
                        action = e.filter.on_request(req, &mut ctx);
                    }
                }
            }
        }
        Ok(())
    }

    /// Run the response hooks in reverse order, then let filters wrap the body.
    pub fn encode<'a>(
        &self,
        resp: http::Response<BoxBody>,
        info: &'a StreamInfo<'a>,
        state: &mut ChainState,
    ) -> http::Response<BoxBody> {
        let (mut parts, mut body) = resp.into_parts();
        for (index, e) in self.entries.iter().enumerate().rev() {
            let Some(route_config) = Self::resolve(e, info) else {
                continue;
            };
            let mut ctx = FilterContext {
                stream: info,
                route_config,
                state,
                index,
            };
            e.filter.on_response(&mut parts, &mut ctx);
            body = e.filter.wrap_response_body(body, &mut ctx);
        }
        http::Response::from_parts(parts, body)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::AddHeader;
    use http_body_util::BodyExt;

    pub(crate) fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    pub(crate) fn info<'a>(route: Option<RouteView<'a>>, seed: u64) -> StreamInfo<'a> {
        static CONN: std::sync::OnceLock<ConnectionState> = std::sync::OnceLock::new();
        StreamInfo::new(
            addr("10.0.0.1:1234"),
            addr("127.0.0.1:80"),
            1,
            false,
            "example.com",
            "/",
            "http",
            route,
            &HealthyServer,
            CONN.get_or_init(ConnectionState::default),
            seed,
        )
    }

    #[derive(Debug)]
    struct Stop;
    impl HttpFilter for Stop {
        fn name(&self) -> &str {
            "stop"
        }
        fn on_request(
            &self,
            _req: &mut http::request::Parts,
            ctx: &mut FilterContext<'_>,
        ) -> FilterAction {
            ctx.set_state(7u32);
            if ctx.route_config_as::<&'static str>().is_some() {
                return FilterAction::Pause(Box::pin(async {
                    FilterAction::Respond(LocalReply::new(http::StatusCode::IM_A_TEAPOT, "", "X"))
                }));
            }
            FilterAction::Continue
        }
        fn on_response(&self, resp: &mut http::response::Parts, ctx: &mut FilterContext<'_>) {
            let seen = ctx.state::<u32>().copied().unwrap_or(0);
            resp.headers.insert("x-stop-state", seen.into());
        }
    }

    fn chain() -> FilterChain {
        FilterChain::new(vec![
            ChainEntry {
                name: "add".into(),
                filter: Arc::new(AddHeader {
                    name: http::HeaderName::from_static("x-a"),
                    value: http::HeaderValue::from_static("1"),
                }),
                disabled: false,
                type_url: String::new(),
            },
            ChainEntry {
                name: "stop".into(),
                filter: Arc::new(Stop),
                disabled: true,
                type_url: String::new(),
            },
        ])
    }

    #[tokio::test]
    async fn runs_in_order_with_per_route_config_and_state() {
        let c = chain();
        // No route: `stop` is disabled by default and skipped.
        let (mut parts, _) = http::Request::new(()).into_parts();
        let i = info(None, 1);
        let mut st = ChainState::default();
        c.decode(&mut parts, &i, &mut st).await.expect("continues");
        assert_eq!(parts.headers["x-a"], "1");
        let resp = http::Response::new(crate::body::empty());
        let resp = c.encode(resp, &i, &mut st);
        assert_eq!(resp.headers()["x-a"], "1");
        assert!(resp.headers().get("x-stop-state").is_none());

        // A route enabling `stop` with a config: it pauses, then answers.
        let cfg: Arc<dyn Any + Send + Sync> = Arc::new("on");
        let route = RouteFilterData {
            per_filter: PerFilterConfigs(vec![("stop".into(), PerFilterConfig::Config(cfg))]),
            rate_limits: vec![],
        };
        let vhost = RouteFilterData::default();
        let view = RouteView {
            route_name: "r",
            route: &route,
            vhost: &vhost,
            route_rate_limits: &[],
            include_vh_rate_limits: false,
        };
        let i = info(Some(view), 1);
        let mut st = ChainState::default();
        let (mut parts, _) = http::Request::new(()).into_parts();
        let r = c
            .decode(&mut parts, &i, &mut st)
            .await
            .expect_err("stopped");
        assert_eq!(r.status, http::StatusCode::IM_A_TEAPOT);
        let resp = c.encode(http::Response::new(crate::body::empty()), &i, &mut st);
        assert_eq!(resp.headers()["x-stop-state"], "7");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.is_empty());

        // Disabled at the virtual host: skipped again.
        let vhost = RouteFilterData {
            per_filter: PerFilterConfigs(vec![("stop".into(), PerFilterConfig::Disabled)]),
            rate_limits: vec![],
        };
        let empty = RouteFilterData::default();
        let view = RouteView {
            route_name: "r",
            route: &empty,
            vhost: &vhost,
            route_rate_limits: &[],
            include_vh_rate_limits: false,
        };
        let i = info(Some(view), 1);
        let (mut parts, _) = http::Request::new(()).into_parts();
        c.decode(&mut parts, &i, &mut ChainState::default())
            .await
            .expect("continues");
    }

    #[test]
    fn rolls_are_deterministic_per_seed() {
        let a = info(None, 42);
        let b = info(None, 42);
        let xs: Vec<u64> = (0..4).map(|_| a.roll()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.roll()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], xs[1]);
    }
}
