//! Listeners: translation of Envoy `Listener`s, filter-chain matching, binding one
//! SO_REUSEPORT socket per worker, accept loops, and the `tcp_proxy` network filter.
//!
//! # Layout
//! - [`translate`](translate_listener): `Listener` proto -> [`ListenerConfig`] (with stats
//!   handles resolved and the chain matcher compiled).
//! - [`chain_match`]: Envoy's filter-chain selection as a compiled tree.
//! - [`manager`]: the [`ListenerManager`]: adds, replaces (in place or with new sockets) and
//!   removes listeners at runtime; each listener *version* drains on its own tokens.
//! - `bind`: one SO_REUSEPORT socket per listener and worker.
//! - `worker`: a worker's accept loops, driven by the manager's commands, and connection
//!   dispatch ([`run_worker`]); a chain's
//!   `envoy.filters.network.local_ratelimit` filters (before the terminal filter) take a
//!   token per new connection and close it at once when empty
//!   ([`weir_filters::local_ratelimit::ConnectionLimiter`]).
//! - [`connection_limit`]: `envoy.filters.network.connection_limit` (before the terminal
//!   filter): a concurrent connection cap per filter config, checked when the connection is
//!   set up; over it the connection is closed (after `delay`) without being read.
//! - Edge limits at accept ([`crate::overload`]): the global downstream connection limit
//!   (`ignore_global_conn_limit` listeners are exempt but counted), the overload actions
//!   `reject_incoming_connections` / `stop_accepting_connections`, and the listener's runtime
//!   connection limit; `per_connection_buffer_limit_bytes` bounds hyper's HTTP/1 read buffer,
//!   HTTP/2 stream windows and send buffers, and tcp_proxy's copy buffers.
//! - [`rbac`]: `envoy.filters.network.rbac` (before the terminal filter), evaluated once per
//!   connection after the TLS handshake; a denied connection is closed.
//! - [`tcp_proxy`]: the `tcp_proxy` network filter and its byte-moving engines (splice on
//!   Linux, buffered copy elsewhere or as fallback).
//! - Transparent interception and edge listener filters (docs/arch-intercept.md):
//!   `intercept` (the listener-filter pipeline), `original_dst` (SO_ORIGINAL_DST),
//!   [`proxy_protocol`] (PROXY v1/v2), [`http_inspector`] (HTTP/1.x / h2c detection),
//!   [`peek`] (shared MSG_PEEK loop); `use_original_dst` hand-off and `bind_to_port: false`
//!   listeners through [`ListenerManager::version_for_address`].
//!
//! OWNER: listener helper. Interface used by `server` and the xDS client (LDS).

pub mod chain_match;
pub mod connection_limit;
pub mod manager;
pub mod rbac;
pub mod tcp_proxy;

mod bind;
pub mod http_inspector;
mod intercept;
mod original_dst;
pub mod peek;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
mod splice;
mod translate;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

pub use chain_match::{ChainInput, ChainMatch, ChainMatcher};
pub use manager::{ListenerChange, ListenerError, ListenerManager};
pub use translate::translate_listener;
pub use worker::run_worker;

use crate::config::hcm::HcmConfig;
use crate::stats::Scope;
use tcp_proxy::TcpProxyConfig;

/// Default `per_connection_buffer_limit_bytes` (Envoy's 1 MiB).
pub const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;
/// Default listen backlog (`tcp_backlog_size`).
pub const DEFAULT_BACKLOG: u32 = 1024;

/// A translated listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// `name`.
    pub name: String,
    /// Address to bind (port 0 = any free port; the bound one is reported).
    pub address: SocketAddr,
    /// Filter chains in config order.
    pub filter_chains: Vec<FilterChain>,
    /// `default_filter_chain`.
    pub default_filter_chain: Option<FilterChain>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub per_connection_buffer_limit_bytes: u32,
    /// `address.socket_address.ipv4_compat`: an IPv6 socket also accepts IPv4 (dual stack);
    /// otherwise IPv6 sockets are IPV6_V6ONLY.
    pub ipv4_compat: bool,
    /// `tcp_backlog_size` (default 1024).
    pub backlog: u32,
    /// Listener filters, in order (only the TLS inspector is known).
    pub listener_filters: Vec<ListenerFilter>,
    /// The TLS inspector's stats when it runs on this listener (configured, or added because
    /// a filter chain matches on `server_names` / `transport_protocol: tls` /
    /// `application_protocols`, as Envoy does).
    pub tls_inspector: Option<Arc<crate::tls::inspector::InspectorStats>>,
    /// `listener_filters_timeout` (default 15 s), for when listener filters run.
    pub listener_filters_timeout: Duration,
    /// `continue_on_listener_filters_timeout`.
    pub continue_on_listener_filters_timeout: bool,
    /// The compiled matcher over `filter_chains`.
    pub matcher: ChainMatcher,
    /// `listener.<address>.*` stats.
    pub stats: ListenerStats,
    /// `use_original_dst` / `bind_to_port` (transparent interception).
    pub intercept: Intercept,
    /// `ignore_global_conn_limit`: the global downstream connection limit does not refuse
    /// this listener's connections (they still count in it).
    pub ignore_global_conn_limit: bool,
}

/// Listener options of transparent interception (see docs/arch-intercept.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intercept {
    /// `use_original_dst`: after the listener filters restored the original destination,
    /// hand the connection to the listener whose address matches it (exact, then the
    /// wildcard address with the same port); this listener's chains serve the rest.
    pub use_original_dst: bool,
    /// `bind_to_port` (default true): `false` registers the listener without a socket; it
    /// only receives connections handed off by a `use_original_dst` listener.
    pub bind_to_port: bool,
}

impl Default for Intercept {
    fn default() -> Self {
        Self {
            use_original_dst: false,
            bind_to_port: true,
        }
    }
}

impl ListenerConfig {
    /// The filter chain for a connection: Envoy's matching over `filter_chains`, else the
    /// `default_filter_chain`, else `None` (close the connection, count
    /// `no_filter_chain_match`).
    pub fn select(&self, input: &ChainInput<'_>) -> Option<&FilterChain> {
        match self.matcher.select(input) {
            Some(i) => self.filter_chains.get(i),
            None => self.default_filter_chain.as_ref(),
        }
    }
}

/// Known listener filters (run in config order; see `intercept`).
#[derive(Debug, Clone)]
pub enum ListenerFilter {
    /// `envoy.filters.listener.tls_inspector`: SNI/ALPN/transport protocol for chain matching.
    TlsInspector,
    /// `envoy.filters.listener.original_dst`: the pre-NAT destination becomes the local
    /// address.
    OriginalDst,
    /// `envoy.filters.listener.http_inspector`: HTTP/1.x / h2c detection for
    /// `application_protocols`.
    HttpInspector(Arc<http_inspector::HttpInspectorStats>),
    /// `envoy.filters.listener.proxy_protocol`: PROXY v1/v2 header consumed; its addresses
    /// become the peer and local addresses.
    ProxyProtocol(Arc<proxy_protocol::ProxyProtocolConfig>),
}

/// One filter chain.
#[derive(Debug)]
pub struct FilterChain {
    /// `name`.
    pub name: String,
    /// `filter_chain_match`, validated.
    pub filter_chain_match: ChainMatch,
    /// `envoy.filters.network.local_ratelimit` filters before the terminal one, in order: a
    /// new connection takes a token from each; the first without one closes it at once.
    pub rate_limits: Vec<Arc<weir_filters::local_ratelimit::ConnectionLimiter>>,
    /// `envoy.filters.network.connection_limit` filters before the terminal one, in order
    /// (checked after the local rate limits): each holds a slot for the connection's
    /// lifetime; the first over its limit closes it ([`connection_limit::admit`]).
    pub connection_limits: Vec<Arc<connection_limit::ConnectionLimit>>,
    /// `envoy.filters.network.rbac` filters before the terminal one, in order: evaluated once
    /// per connection after the TLS handshake; the first that denies closes it
    /// ([`rbac::admit`]).
    pub rbac: Vec<Arc<rbac::NetworkRbac>>,
    /// The terminal network filter.
    pub filter: NetworkFilter,
    /// `transport_socket` `envoy.transport_sockets.tls`: TLS is terminated before the filter
    /// runs (`None`: plain text or passthrough).
    pub tls: Option<Arc<crate::tls::ServerTls>>,
}

/// Terminal network filters.
#[derive(Debug, Clone)]
pub enum NetworkFilter {
    /// `envoy.filters.network.http_connection_manager`.
    Http(Arc<HcmConfig>),
    /// `envoy.filters.network.tcp_proxy`.
    TcpProxy(Arc<TcpProxyConfig>),
}

/// `listener.<ip>_<port>.*` (Envoy names).
#[derive(Debug, Clone)]
pub struct ListenerStats {
    /// `downstream_cx_total`.
    pub downstream_cx_total: Counter,
    /// `downstream_cx_active`.
    pub downstream_cx_active: Gauge,
    /// `downstream_cx_destroy`.
    pub downstream_cx_destroy: Counter,
    /// `no_filter_chain_match`.
    pub no_filter_chain_match: Counter,
    /// `downstream_cx_length_ms`.
    pub downstream_cx_length_ms: Histogram,
    /// `downstream_pre_cx_timeout`: listener filters timed out.
    pub downstream_pre_cx_timeout: Counter,
    /// `downstream_global_cx_overflow`: refused by the global connection limit.
    pub downstream_global_cx_overflow: Counter,
    /// `downstream_cx_overload_reject`: refused by `reject_incoming_connections`.
    pub downstream_cx_overload_reject: Counter,
    /// `downstream_cx_overflow`: refused by the listener's runtime connection limit.
    pub downstream_cx_overflow: Counter,
}

impl ListenerStats {
    /// Register under `listener.<address>.`.
    pub fn new(scope: &Scope) -> Self {
        Self {
            downstream_cx_total: scope.counter("downstream_cx_total"),
            downstream_cx_active: scope.gauge("downstream_cx_active"),
            downstream_cx_destroy: scope.counter("downstream_cx_destroy"),
            no_filter_chain_match: scope.counter("no_filter_chain_match"),
            downstream_cx_length_ms: scope.histogram("downstream_cx_length_ms"),
            downstream_pre_cx_timeout: scope.counter("downstream_pre_cx_timeout"),
            downstream_global_cx_overflow: scope.counter("downstream_global_cx_overflow"),
            downstream_cx_overload_reject: scope.counter("downstream_cx_overload_reject"),
            downstream_cx_overflow: scope.counter("downstream_cx_overflow"),
        }
    }

    /// Handles that record nothing (tests).
    pub fn noop() -> Self {
        Self {
            downstream_cx_total: Counter::noop(),
            downstream_cx_active: Gauge::noop(),
            downstream_cx_destroy: Counter::noop(),
            no_filter_chain_match: Counter::noop(),
            downstream_cx_length_ms: Histogram::noop(),
            downstream_pre_cx_timeout: Counter::noop(),
            downstream_global_cx_overflow: Counter::noop(),
            downstream_cx_overload_reject: Counter::noop(),
            downstream_cx_overflow: Counter::noop(),
        }
    }
}

/// Information about an accepted downstream connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Peer address: the TCP peer, or the source a PROXY protocol header carried (Envoy's
    /// remote address).
    pub peer: SocketAddr,
    /// Local address: the socket's, or the original destination restored by
    /// `original_dst` / a PROXY protocol header.
    pub local: SocketAddr,
    /// The TCP peer, whatever a PROXY header said (Envoy's direct remote address; RBAC
    /// `direct_remote_ip`).
    pub direct_peer: SocketAddr,
    /// `local` was restored by a listener filter (Envoy's `localAddressRestored()`): an
    /// ORIGINAL_DST cluster may use it as the upstream.
    pub local_restored: bool,
    /// `per_connection_buffer_limit_bytes` of the listener.
    pub buffer_limit: u32,
    /// Fired when the connection's listener version drains (replaced, removed, or the
    /// server drains): finish in-flight work and close (HTTP/1 `Connection: close`, HTTP/2
    /// GOAWAY).
    pub drain: tokio_util::sync::CancellationToken,
    /// Fired when the version's drain time is over (or the server's): close now.
    pub hard_stop: tokio_util::sync::CancellationToken,
    /// TLS facts (terminated or inspected); `None` for plain text.
    pub tls: Option<Arc<weir_filters::DownstreamTls>>,
}
