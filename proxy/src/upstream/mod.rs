//! The cluster manager: clusters (STATIC, STRICT_DNS), their host sets, load balancing, and
//! per-worker upstream connection pools (HTTP/1.1, HTTP/2) and TCP connects.
//!
//! OWNER: upstream helper. Interface used by `http::router` and `listener::tcp_proxy`.
//!
//! # Layout
//! - [`translate`]: `envoy.config.cluster.v3.Cluster` -> [`ClusterConfig`] (field paths in errors).
//! - `lb`: immutable host sets (swapped with arc-swap) and the load balancers (ROUND_ROBIN,
//!   LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV) with Envoy's priority load, panic threshold,
//!   locality weights and slow start, on per-worker state; `lb::xxhash` is the XXH64 used by
//!   ring keys and route hash policies.
//! - `dns`: STRICT_DNS resolution loops on the main runtime.
//! - `pool`: per-worker HTTP/1.1 and HTTP/2 connection pools, TCP connects, connection stats.
//! - [`health`]: active health checking (HTTP, TCP, gRPC) on the main runtime.
//! - [`outlier`]: outlier detection (per-request atomics, interval sweeps on the main runtime).
//!
//! Host health is a set of [`health_flags`] bits on each [`Host`] (atomics): health checks,
//! outlier detection and EDS status set and clear their own bit; the load balancer skips hosts
//! with any bit set. Nothing is rebuilt when health changes.

pub mod circuit;
mod dns;
mod eds;
pub mod fetch;
pub mod health;
pub(crate) mod lb;
pub mod original_dst;
pub mod outlier;
mod pool;
pub mod translate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

pub use pool::{CxGuard, TcpConnection, UpIo, UpstreamResponseBody};

use crate::stats::{Scope, Store};

/// Boxed error for bodies.
pub type BoxError = weir_filters::BoxError;
/// The body type sent upstream (streams the downstream body through).
pub type UpstreamBody = weir_filters::BoxBody;

/// Translated cluster config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `name`.
    pub name: String,
    /// `type`.
    pub discovery: DiscoveryType,
    /// `load_assignment` endpoints, flattened in config order (priority and locality copied
    /// from their `LocalityLbEndpoints`).
    pub endpoints: Vec<EndpointConfig>,
    /// `connect_timeout` (default 5 s).
    pub connect_timeout: Duration,
    /// `lb_policy` and its settings.
    pub lb_policy: LbPolicy,
    /// Priority/panic, locality and slow-start settings.
    pub lb: LbConfig,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB): bounds hyper's HTTP/1 read buffer
    /// and HTTP/2 send buffer per upstream connection.
    pub per_connection_buffer_limit_bytes: u32,
    /// `dns_refresh_rate` (default 5 s), STRICT_DNS only.
    pub dns_refresh_rate: Duration,
    /// `dns_lookup_family`.
    pub dns_lookup_family: DnsLookupFamily,
    /// Upstream HTTP protocol.
    pub protocol: UpstreamProtocol,
    /// Idle upstream connections are closed after this (default 1 h; `None` = never).
    pub idle_timeout: Option<Duration>,
    /// `circuit_breakers`.
    pub circuit_breakers: circuit::CircuitBreakerConfig,
    /// `health_checks` (at most one, as in Envoy).
    pub health_checks: Vec<HealthCheckConfig>,
    /// `outlier_detection`.
    pub outlier: Option<OutlierConfig>,
    /// `eds_cluster_config` of an EDS cluster.
    pub eds: Option<EdsClusterConfig>,
    /// `transport_socket` `envoy.transport_sockets.tls` (`UpstreamTlsContext`): connections
    /// to the hosts speak TLS (see [`crate::tls::client`]).
    pub tls: Option<crate::tls::config::UpstreamTlsConfig>,
}

/// Where an EDS cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdsClusterConfig {
    /// The `ClusterLoadAssignment` name: `service_name`, else the cluster's name.
    pub service_name: String,
    /// `eds_config`.
    pub source: crate::config::source::ConfigSource,
}

/// `Cluster.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    /// `STATIC`: endpoint addresses are IPs.
    Static,
    /// `STRICT_DNS`: every address of every endpoint hostname is a host, re-resolved every
    /// `dns_refresh_rate`.
    StrictDns,
    /// `EDS`: endpoints arrive as a `ClusterLoadAssignment` from `eds_cluster_config`; they
    /// replace the host set in place ([`Cluster::set_endpoints`]).
    Eds,
    /// `ORIGINAL_DST`: hosts are the original destinations of connections, created on demand
    /// ([`original_dst`]).
    OriginalDst,
}

/// `Cluster.lb_policy` with its policy-specific settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Least request: P2C (`choice_count`, default 2) with equal weights, else weights scaled
    /// by `1 / (active_requests + 1)^active_request_bias` (default 1.0).
    LeastRequest {
        /// `least_request_lb_config.choice_count` (>= 2).
        choice_count: u32,
        /// `least_request_lb_config.active_request_bias.default_value` (>= 0).
        active_request_bias: f64,
    },
    /// Uniformly random.
    Random,
    /// Ketama ring hash (xxHash64).
    RingHash {
        /// `ring_hash_lb_config.minimum_ring_size` (default 1024).
        minimum_ring_size: u64,
        /// `ring_hash_lb_config.maximum_ring_size` (default 8M).
        maximum_ring_size: u64,
    },
    /// Maglev consistent hashing.
    Maglev {
        /// `maglev_lb_config.table_size` (prime, default 65537).
        table_size: u64,
    },
}

impl LbPolicy {
    /// Envoy's default LEAST_REQUEST settings.
    pub const LEAST_REQUEST: LbPolicy = LbPolicy::LeastRequest {
        choice_count: 2,
        active_request_bias: 1.0,
    };
    /// Envoy's default RING_HASH settings.
    pub const RING_HASH: LbPolicy = LbPolicy::RingHash {
        minimum_ring_size: 1024,
        maximum_ring_size: 8 * 1024 * 1024,
    };
    /// Envoy's default MAGLEV settings.
    pub const MAGLEV: LbPolicy = LbPolicy::Maglev { table_size: 65537 };

    /// Envoy's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "ROUND_ROBIN",
            LbPolicy::LeastRequest { .. } => "LEAST_REQUEST",
            LbPolicy::Random => "RANDOM",
            LbPolicy::RingHash { .. } => "RING_HASH",
            LbPolicy::Maglev { .. } => "MAGLEV",
        }
    }
}

/// Settings shared by the policies (`common_lb_config`, `slow_start_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    /// `common_lb_config.healthy_panic_threshold` in percent (default 50; 0 disables panic).
    pub healthy_panic_threshold: f64,
    /// `common_lb_config.locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
    /// `{round_robin,least_request}_lb_config.slow_start_config`.
    pub slow_start: Option<SlowStartConfig>,
    /// ORIGINAL_DST clusters (`lb_policy: CLUSTER_PROVIDED`): hosts come from the
    /// connection or request ([`original_dst`]).
    pub original_dst: Option<original_dst::OriginalDstConfig>,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            healthy_panic_threshold: 50.0,
            locality_weighted: false,
            slow_start: None,
            original_dst: None,
        }
    }
}

/// `SlowStartConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowStartConfig {
    /// `slow_start_window`.
    pub window: Duration,
    /// `aggression.default_value` (default 1.0, > 0).
    pub aggression: f64,
    /// `min_weight_percent` (default 10).
    pub min_weight_percent: f64,
}

/// `Cluster.dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsLookupFamily {
    /// IPv6 addresses if there are any, else IPv4 (Envoy's AUTO).
    Auto,
    /// IPv4 only.
    V4Only,
    /// IPv6 only.
    V6Only,
    /// IPv4 addresses if there are any, else IPv6.
    V4Preferred,
    /// Both families.
    All,
}

/// The protocol spoken to the cluster's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2(Http2Settings),
    /// `use_downstream_protocol_config`: HTTP/2 when the downstream request was HTTP/2.
    UseDownstream(Http2Settings),
}

/// Supported `Http2ProtocolOptions` for upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// Streams per upstream connection before the pool opens another (Envoy default 2^31-1).
    pub max_concurrent_streams: u32,
    /// Stream flow-control window (default 64 KiB: bounds what an upstream can make us buffer).
    pub initial_stream_window_size: u32,
    /// Connection flow-control window (default 1 MiB).
    pub initial_connection_window_size: u32,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 2_147_483_647,
            initial_stream_window_size: 64 * 1024,
            initial_connection_window_size: 1024 * 1024,
        }
    }
}

/// One `LbEndpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Where it is.
    pub address: EndpointAddress,
    /// `endpoint.hostname`, or the DNS name for STRICT_DNS.
    pub hostname: Option<String>,
    /// `load_balancing_weight` (>= 1, default 1).
    pub weight: u32,
    /// `priority` of its `LocalityLbEndpoints` (0 is the highest).
    pub priority: u32,
    /// `locality` of its `LocalityLbEndpoints`.
    pub locality: Option<LocalityConfig>,
    /// Initial [`health_flags`] (`health_status` UNHEALTHY/DRAINING/TIMEOUT ->
    /// `FAILED_EDS_HEALTH`).
    pub health: u32,
}

/// An endpoint address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    /// A literal IP and port.
    Ip(SocketAddr),
    /// A DNS name and port (STRICT_DNS).
    Dns {
        /// Name to resolve.
        host: String,
        /// Port.
        port: u16,
    },
}

/// `core.Locality`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalityConfig {
    /// `region`.
    pub region: String,
    /// `zone`.
    pub zone: String,
    /// `sub_zone`.
    pub sub_zone: String,
    /// `LocalityLbEndpoints.load_balancing_weight` (used by `locality_weighted_lb_config`).
    pub load_balancing_weight: Option<u32>,
}

pub use health::HealthCheckConfig;
pub use outlier::OutlierConfig;
pub use translate::translate_cluster;

impl ClusterConfig {
    /// A STRICT_DNS cluster with at least one hostname to resolve.
    pub fn needs_dns(&self) -> bool {
        self.discovery == DiscoveryType::StrictDns
            && self
                .endpoints
                .iter()
                .any(|e| matches!(e.address, EndpointAddress::Dns { .. }))
    }
}

/// Why an upstream attempt failed (mapped to Envoy response flags by the router).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No healthy host (`UH`).
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// Connect timed out (`UF`).
    #[error("upstream connect timeout")]
    ConnectTimeout,
    /// Connect failed (`UF`).
    #[error("upstream connect error: {0}")]
    ConnectFailure(std::io::Error),
    /// The connection was reset or closed before response headers (`UC`/`UR`).
    #[error("upstream reset before response headers: {0}")]
    Reset(String),
    /// The HTTP handshake with the upstream failed, or the request cannot be expressed in the
    /// upstream protocol (`UF`/`UC`).
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// The upstream refused the HTTP/2 stream (REFUSED_STREAM) before processing it.
    #[error("upstream refused the stream")]
    RefusedStream,
    /// A circuit breaker (connections, pending requests) was open (`UO`).
    #[error("upstream overflow (circuit breaker open)")]
    Overflow,
}

/// Health flag bits of [`Host::health`] (Envoy's `/clusters` health_flags).
pub mod health_flags {
    /// `/failed_active_hc`.
    pub const FAILED_ACTIVE_HC: u32 = 1;
    /// `/failed_outlier_check`.
    pub const FAILED_OUTLIER_CHECK: u32 = 2;
    /// `/failed_eds_health`.
    pub const FAILED_EDS_HEALTH: u32 = 4;
}

/// Per-host counters shown by `/clusters` (plain atomics; no registry entry per host).
#[derive(Debug, Default)]
pub struct HostStats {
    /// `cx_total`.
    pub cx_total: AtomicU64,
    /// `cx_active`.
    pub cx_active: AtomicU64,
    /// `cx_connect_fail`.
    pub cx_connect_fail: AtomicU64,
    /// `rq_total` (recorded by the router).
    pub rq_total: AtomicU64,
    /// `rq_active` (recorded by the router).
    pub rq_active: AtomicU64,
    /// `rq_success`: non-5xx responses (recorded by the router).
    pub rq_success: AtomicU64,
    /// `rq_error`: 5xx and resets (recorded by the router).
    pub rq_error: AtomicU64,
    /// `rq_timeout` (recorded by the router).
    pub rq_timeout: AtomicU64,
}

/// One upstream host.
#[derive(Debug)]
pub struct Host {
    /// Resolved address.
    pub address: SocketAddr,
    /// Hostname it was resolved from (STRICT_DNS), for `auto_host_rewrite`.
    pub hostname: Option<String>,
    /// `load_balancing_weight` (>= 1).
    pub weight: u32,
    /// Priority level of its `LocalityLbEndpoints`.
    pub priority: u32,
    /// [`health_flags`] bits; 0 = healthy.
    pub health: AtomicU32,
    /// Counters.
    pub stats: HostStats,
    /// Active health-check streaks.
    pub hc: health::HostHc,
    /// Outlier-detection counters and ejection state.
    pub outlier: outlier::HostOutlier,
    /// Locality (and its weight) of its `LocalityLbEndpoints`.
    pub locality: Option<LocalityConfig>,
    /// When the host was added or last became healthy (slow start), as nanoseconds since
    /// [`clock_epoch`].
    healthy_since: AtomicU64,
}

/// The process-wide origin of [`Host`] timestamps.
fn clock_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn since_epoch(t: std::time::Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(clock_epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Host {
    /// A host with zeroed stats and the given [`health_flags`].
    pub fn new(
        address: SocketAddr,
        hostname: Option<String>,
        weight: u32,
        priority: u32,
        health: u32,
    ) -> Self {
        Self {
            address,
            hostname,
            weight,
            priority,
            health: AtomicU32::new(health),
            stats: HostStats::default(),
            hc: health::HostHc::default(),
            outlier: outlier::HostOutlier::default(),
            locality: None,
            healthy_since: AtomicU64::new(since_epoch(std::time::Instant::now())),
        }
    }

    /// With the locality (and locality weight) of its `LocalityLbEndpoints`.
    pub fn with_locality(mut self, locality: Option<LocalityConfig>) -> Self {
        self.locality = locality;
        self
    }

    /// The host became healthy at `at` (slow start ramps from here). Later calls win; an
    /// earlier time never moves it back.
    pub fn mark_healthy_since(&self, at: std::time::Instant) {
        self.healthy_since
            .fetch_max(since_epoch(at), Ordering::Relaxed);
    }

    /// Set when the host became healthy (also moving it back; for callers that know better,
    /// e.g. a health checker, and tests).
    pub fn set_healthy_since(&self, at: std::time::Instant) {
        self.healthy_since.store(since_epoch(at), Ordering::Relaxed);
    }

    /// The slow-start clock as stored (for a host that replaces this one).
    pub(crate) fn healthy_since_nanos(&self) -> u64 {
        self.healthy_since.load(Ordering::Relaxed)
    }

    /// Restore a slow-start clock read with [`Host::healthy_since_nanos`].
    pub(crate) fn set_healthy_since_nanos(&self, n: u64) {
        self.healthy_since.store(n, Ordering::Relaxed);
    }

    /// How long the host has been healthy (or present) at `now`.
    pub fn healthy_for(&self, now: std::time::Instant) -> Duration {
        let since = Duration::from_nanos(self.healthy_since.load(Ordering::Relaxed));
        now.saturating_duration_since(clock_epoch())
            .saturating_sub(since)
    }

    /// No [`health_flags`] bit set.
    pub fn is_healthy(&self) -> bool {
        self.health.load(Ordering::Relaxed) == 0
    }
}

/// What the router knows when it asks a cluster for a host.
#[derive(Debug, Default, Clone, Copy)]
pub struct LbContext<'a> {
    /// The request's hash from the route's `hash_policy` (RING_HASH, MAGLEV); `None` when the
    /// route has none or no policy produced a value (the LB then picks at random).
    pub hash: Option<u64>,
    /// Hosts earlier attempts of this request used (`retry_host_predicate: previous_hosts`):
    /// the LB re-picks up to `max_reselects` times to avoid them.
    pub avoid: &'a [Arc<Host>],
    /// `host_selection_retry_max_attempts` (0 when no predicate is configured).
    pub max_reselects: u32,
    /// The downstream connection's restored local address (`ConnInfo.local` when
    /// `local_restored`): the upstream of an ORIGINAL_DST cluster.
    pub original_dst: Option<SocketAddr>,
    /// The request headers (HTTP), for an ORIGINAL_DST cluster's `use_http_header`.
    pub headers: Option<&'a http::HeaderMap>,
}

/// The outcome of one request to a host, reported by the router for outlier detection.
///
/// `Status` is an external-origin result (the host answered); the others are local-origin
/// (Envoy's `LOCAL_ORIGIN_*`): with `split_external_local_origin_errors` they count towards
/// `consecutive_local_origin_failure`, without it they count as gateway errors (5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostResult {
    /// The host answered with this HTTP status (gRPC: the HTTP status of the response).
    Status(u16),
    /// A connection to the host could not be opened (refused, timed out connecting).
    ConnectFailed,
    /// The host accepted the connection and answered (local-origin success).
    ConnectSucceeded,
    /// No response headers before the (per-try) timeout.
    Timeout,
    /// The connection or stream was reset before response headers.
    Reset,
}

/// Per-cluster stats (Envoy names). The router records the `upstream_rq_*` ones; the pool the
/// `upstream_cx_*` ones.
#[derive(Debug, Clone)]
pub struct ClusterStats {
    /// `upstream_rq_total`.
    pub upstream_rq_total: Counter,
    /// `upstream_rq_{1..5}xx`.
    pub upstream_rq_xx: [Counter; 5],
    /// `upstream_rq_completed`.
    pub upstream_rq_completed: Counter,
    /// `upstream_rq_active`.
    pub upstream_rq_active: Gauge,
    /// `upstream_rq_time` (ms).
    pub upstream_rq_time: Histogram,
    /// `upstream_rq_timeout`.
    pub upstream_rq_timeout: Counter,
    /// `upstream_rq_rx_reset`.
    pub upstream_rq_rx_reset: Counter,
    /// `upstream_rq_tx_reset`.
    pub upstream_rq_tx_reset: Counter,
    /// `upstream_cx_none_healthy`.
    pub upstream_cx_none_healthy: Counter,
    /// `lb_healthy_panic`: picks made in panic mode (health ignored).
    pub lb_healthy_panic: Counter,
    /// `upstream_cx_total`.
    pub upstream_cx_total: Counter,
    /// `upstream_cx_active`.
    pub upstream_cx_active: Gauge,
    /// `upstream_cx_connect_fail`.
    pub upstream_cx_connect_fail: Counter,
    /// `upstream_cx_connect_timeout`.
    pub upstream_cx_connect_timeout: Counter,
    /// `upstream_cx_http1_total`.
    pub upstream_cx_http1_total: Counter,
    /// `upstream_cx_http2_total`.
    pub upstream_cx_http2_total: Counter,
    /// `upstream_cx_destroy`: connections closed (including failed connects).
    pub upstream_cx_destroy: Counter,
    /// `upstream_cx_idle_timeout`.
    pub upstream_cx_idle_timeout: Counter,
    /// `upstream_cx_rx_bytes_total`.
    pub upstream_cx_rx_bytes_total: Counter,
    /// `upstream_cx_tx_bytes_total`.
    pub upstream_cx_tx_bytes_total: Counter,
    /// `upstream_cx_overflow`: the connection circuit breaker was open.
    pub upstream_cx_overflow: Counter,
    /// `upstream_rq_pending_overflow`: the pending-request or request breaker was open.
    pub upstream_rq_pending_overflow: Counter,
    /// `upstream_rq_pending_total`: requests that waited for a connection.
    pub upstream_rq_pending_total: Counter,
    /// `upstream_rq_pending_active`.
    pub upstream_rq_pending_active: Gauge,
    /// `upstream_rq_retry`.
    pub upstream_rq_retry: Counter,
    /// `upstream_rq_retry_success`: a retry got a response that was not retried again.
    pub upstream_rq_retry_success: Counter,
    /// `upstream_rq_retry_overflow`: a retry was refused by the retry breaker or budget.
    pub upstream_rq_retry_overflow: Counter,
    /// `upstream_rq_retry_limit_exceeded`: retriable, but `num_retries` was used up.
    pub upstream_rq_retry_limit_exceeded: Counter,
    /// `upstream_rq_retry_backoff_exponential`.
    pub upstream_rq_retry_backoff_exponential: Counter,
    /// `upstream_rq_per_try_timeout`.
    pub upstream_rq_per_try_timeout: Counter,
    /// `retry_or_shadow_abandoned`: the request body outgrew the buffer, so no retry or
    /// mirror could use it.
    pub retry_or_shadow_abandoned: Counter,
}

impl ClusterStats {
    /// Register under `cluster.<name>.`.
    pub fn new(scope: &Scope) -> Self {
        Self {
            upstream_rq_total: scope.counter("upstream_rq_total"),
            upstream_rq_xx: scope.class_counters("upstream_rq"),
            upstream_rq_completed: scope.counter("upstream_rq_completed"),
            upstream_rq_active: scope.gauge("upstream_rq_active"),
            upstream_rq_time: scope.histogram("upstream_rq_time"),
            upstream_rq_timeout: scope.counter("upstream_rq_timeout"),
            upstream_rq_rx_reset: scope.counter("upstream_rq_rx_reset"),
            upstream_rq_tx_reset: scope.counter("upstream_rq_tx_reset"),
            upstream_cx_none_healthy: scope.counter("upstream_cx_none_healthy"),
            lb_healthy_panic: scope.counter("lb_healthy_panic"),
            upstream_cx_total: scope.counter("upstream_cx_total"),
            upstream_cx_active: scope.gauge("upstream_cx_active"),
            upstream_cx_connect_fail: scope.counter("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: scope.counter("upstream_cx_connect_timeout"),
            upstream_cx_http1_total: scope.counter("upstream_cx_http1_total"),
            upstream_cx_http2_total: scope.counter("upstream_cx_http2_total"),
            upstream_cx_destroy: scope.counter("upstream_cx_destroy"),
            upstream_cx_idle_timeout: scope.counter("upstream_cx_idle_timeout"),
            upstream_cx_rx_bytes_total: scope.counter("upstream_cx_rx_bytes_total"),
            upstream_cx_tx_bytes_total: scope.counter("upstream_cx_tx_bytes_total"),
            upstream_cx_overflow: scope.counter("upstream_cx_overflow"),
            upstream_rq_pending_overflow: scope.counter("upstream_rq_pending_overflow"),
            upstream_rq_pending_total: scope.counter("upstream_rq_pending_total"),
            upstream_rq_pending_active: scope.gauge("upstream_rq_pending_active"),
            upstream_rq_retry: scope.counter("upstream_rq_retry"),
            upstream_rq_retry_success: scope.counter("upstream_rq_retry_success"),
            upstream_rq_retry_overflow: scope.counter("upstream_rq_retry_overflow"),
            upstream_rq_retry_limit_exceeded: scope.counter("upstream_rq_retry_limit_exceeded"),
            upstream_rq_retry_backoff_exponential: scope
                .counter("upstream_rq_retry_backoff_exponential"),
            upstream_rq_per_try_timeout: scope.counter("upstream_rq_per_try_timeout"),
            retry_or_shadow_abandoned: scope.counter("retry_or_shadow_abandoned"),
        }
    }
}

/// Source of [`Cluster`] identities (keys of the per-worker LB and pool state).
static NEXT_CLUSTER_UID: AtomicU64 = AtomicU64::new(1);

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    config: Arc<ClusterConfig>,
    stats: Arc<ClusterStats>,
    /// Circuit breakers (cluster-wide atomics).
    breakers: circuit::CircuitBreakers,
    /// Current hosts; replaced whole by DNS refreshes.
    host_set: arc_swap::ArcSwap<lb::HostSet>,
    /// Unique identity, never reused (a new config for the same name is a new cluster).
    uid: u64,
    /// Per-thread state keyed by `uid` holds a `Weak` of this to notice the cluster is gone.
    alive: Arc<()>,
    /// Cancelled once the first DNS resolution was attempted (at once for clusters that need
    /// none): Envoy's cluster warming.
    warmed: tokio_util::sync::CancellationToken,
    /// Cancelled once every initial host had its first active health check (at once without
    /// health checks).
    hc_warmed: tokio_util::sync::CancellationToken,
    /// Active health checker, when `health_checks` is set.
    health: Option<Arc<health::HealthChecker>>,
    /// Outlier detector, when `outlier_detection` is set.
    outlier: Option<outlier::Detector>,
    /// Signalled whenever `host_set` is replaced (the health checker follows host changes);
    /// dropped with the cluster, which ends the health checker.
    hosts_changed: tokio::sync::watch::Sender<()>,
    /// Upstream TLS built from `config.tls` (with `cluster.<name>.ssl.*` stats).
    pub(crate) tls: Option<Arc<crate::tls::ClientTls>>,
    /// Cancelled when warming stops waiting for the TLS context's SDS secrets (they arrived,
    /// or `initial_fetch_timeout` passed).
    tls_warmed: tokio_util::sync::CancellationToken,
    /// ORIGINAL_DST: the on-demand hosts (`choose_host` asks them instead of the LB).
    original_dst: Option<original_dst::OriginalDstHosts>,
}

impl Cluster {
    /// A cluster with its initial hosts (IP endpoints; DNS endpoints resolve in
    /// [`ClusterManager::start`]).
    pub fn new(config: Arc<ClusterConfig>, store: &Arc<Store>) -> Self {
        let scope = store.cluster(&config.name);
        let stats = Arc::new(ClusterStats::new(&scope));
        let breakers = circuit::CircuitBreakers::new(&config.circuit_breakers, &scope);
        let host_set = arc_swap::ArcSwap::from_pointee(dns::initial_set(&config));
        let warmed = tokio_util::sync::CancellationToken::new();
        if !config.needs_dns() && config.discovery != DiscoveryType::Eds {
            warmed.cancel();
        }
        let tls = config.tls.as_ref().map(|t| {
            Arc::new(crate::tls::ClientTls::new(
                t.clone(),
                crate::tls::secrets::registry(store),
                Arc::new(crate::tls::SslStats::new(&scope)),
            ))
        });
        // Health checks use the cluster's transport socket, as Envoy's do.
        let health = config.health_checks.first().map(|hc| {
            Arc::new(
                health::HealthChecker::new(hc.clone(), &config.name, &scope).with_tls(tls.clone()),
            )
        });
        let hc_warmed = tokio_util::sync::CancellationToken::new();
        if health.is_none() {
            hc_warmed.cancel();
        }
        let outlier = config
            .outlier
            .as_ref()
            .map(|o| outlier::Detector::new(o.clone(), &config.name, &scope));
        let original_dst = config
            .lb
            .original_dst
            .clone()
            .map(|c| original_dst::OriginalDstHosts::new(c, &scope));
        Self {
            config,
            stats,
            breakers,
            host_set,
            uid: NEXT_CLUSTER_UID.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            warmed,
            hc_warmed,
            health,
            outlier,
            hosts_changed: tokio::sync::watch::Sender::new(()),
            tls,
            tls_warmed: tokio_util::sync::CancellationToken::new(),
            original_dst,
        }
    }

    /// The active health checker, if `health_checks` is configured.
    pub fn health_checker(&self) -> Option<&health::HealthChecker> {
        self.health.as_deref()
    }

    /// The outlier detector, if `outlier_detection` is configured.
    pub fn outlier_detector(&self) -> Option<&outlier::Detector> {
        self.outlier.as_ref()
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Config.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Stats.
    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }

    /// Circuit breaker resources for a routing priority.
    pub fn resources(&self, p: circuit::Priority) -> &circuit::ResourceManager {
        self.breakers.get(p)
    }

    /// The current host set (all priorities, in config order).
    pub fn hosts(&self) -> Arc<Vec<Arc<Host>>> {
        self.host_set.load().hosts.clone()
    }

    /// Every host the admin `/clusters` page shows: the host set, plus the on-demand hosts
    /// of an ORIGINAL_DST cluster (sorted by address so the page is stable), as Envoy lists
    /// an original-destination cluster's current hosts.
    pub fn admin_hosts(&self) -> Arc<Vec<Arc<Host>>> {
        match &self.original_dst {
            None => self.hosts(),
            Some(od) => {
                let mut all: Vec<Arc<Host>> = self.hosts().iter().cloned().collect();
                let mut extra = od.hosts();
                extra.sort_by_key(|h| h.address);
                all.extend(extra);
                Arc::new(all)
            }
        }
    }

    /// Pick a host with the cluster's `lb_policy` across priorities (Envoy's priority load
    /// with overprovisioning factor 1.4 and the healthy panic threshold), using per-worker
    /// state and no shared lock. `ctx.hash` drives RING_HASH / MAGLEV; hosts in `ctx.avoid`
    /// are re-picked up to `ctx.max_reselects` times. `None` (and `upstream_cx_none_healthy`
    /// counted) when no host can be chosen; a pick in panic mode counts `lb_healthy_panic`.
    pub fn choose_host(&self, ctx: &LbContext<'_>) -> Option<Arc<Host>> {
        if let Some(od) = &self.original_dst {
            let h = od.choose(ctx);
            if h.is_none() {
                self.stats.upstream_cx_none_healthy.increment(1);
            }
            return h;
        }
        let set = self.host_set.load();
        let (h, panic) = lb::choose(
            &set,
            &self.config.lb_policy,
            &self.config.lb,
            ctx,
            self.uid,
            &self.alive,
        );
        if panic {
            self.stats.lb_healthy_panic.increment(1);
        }
        if h.is_none() {
            self.stats.upstream_cx_none_healthy.increment(1);
        }
        h
    }

    /// Record the outcome of a request to `host` (outlier detection; a no-op without
    /// `outlier_detection`). Per request this only touches the host's atomics.
    pub fn report(&self, host: &Arc<Host>, result: HostResult) {
        if let Some(d) = &self.outlier {
            d.put(host, result, || self.hosts());
        }
    }

    /// The host answered with `x-envoy-immediate-health-check-fail`: mark it failed by active
    /// health checking at once (a no-op without `health_checks`, or for a host no longer in
    /// the cluster). The next passing checks (`healthy_threshold` of them) clear it.
    pub fn immediate_health_check_fail(&self, host: &Arc<Host>) {
        if let Some(hc) = &self.health
            && self.hosts().iter().any(|h| Arc::ptr_eq(h, host))
        {
            hc.on_failure(
                host,
                health::Failure::Passive,
                "x-envoy-immediate-health-check-fail",
            );
        }
    }

    /// Send a request to `host` on this worker's pool.
    ///
    /// The request URI is origin-form (plus a `Host` header) or absolute. HTTP/1.1 is sent in
    /// origin-form with `Host`; HTTP/2 in absolute-form `http://{Host}{path}` with the `host`
    /// header dropped (it becomes `:authority`) and connection-specific headers removed. The
    /// protocol follows the cluster's protocol options, and `downstream_h2` for
    /// `use_downstream_protocol_config`. `priority` selects the circuit breaker thresholds:
    /// without an idle connection and with the connection breaker open, the request waits for
    /// one of this worker's connections (a pending request), or fails with
    /// [`UpstreamError::Overflow`] when the pending breaker is open too.
    ///
    /// The returned body must be read to its end for an HTTP/1.1 connection to be reused; see
    /// [`UpstreamResponseBody`]. Errors: [`UpstreamError::ConnectFailure`] /
    /// [`UpstreamError::ConnectTimeout`] when no connection could be made,
    /// [`UpstreamError::Reset`] when it failed before response headers,
    /// [`UpstreamError::Protocol`] when the handshake failed or the request is not expressible.
    pub async fn send_http(
        &self,
        host: &Arc<Host>,
        req: http::Request<UpstreamBody>,
        downstream_h2: bool,
        priority: circuit::Priority,
    ) -> Result<http::Response<UpstreamResponseBody>, UpstreamError> {
        self.send_http_impl(host, req, downstream_h2, priority)
            .await
    }

    /// Open a byte stream to `host` (connect_timeout applied, TCP_NODELAY set, cx stats
    /// counted): TCP, then the TLS handshake when the cluster has a TLS `transport_socket`
    /// (TLS origination, `h2` left out of the offered ALPN). Keep the returned [`TcpConnection::guard`] until the stream is closed: it holds
    /// the connection's place in `upstream_cx_active`.
    ///
    /// [`UpstreamError::Overflow`] (and `upstream_cx_overflow` counted) when the connection
    /// circuit breaker of `priority` is open.
    pub async fn connect_tcp(
        &self,
        host: &Arc<Host>,
        priority: circuit::Priority,
    ) -> Result<TcpConnection, UpstreamError> {
        self.connect_tcp_impl(host, priority).await
    }
}

/// All clusters.
///
/// Reads (`get`, once per request) are a lock-free `ArcSwap` load. Writes (static start-up,
/// CDS) replace the whole map under `write`, a mutex only control-plane updates take. A
/// cluster replaced or removed stays alive for as long as requests hold its `Arc` (they
/// finish on it: Envoy's cluster drain); its background tasks end when the last `Arc` goes.
#[derive(Debug)]
pub struct ClusterManager {
    clusters: arc_swap::ArcSwap<std::collections::HashMap<String, Arc<Cluster>>>,
    /// Serializes writers.
    write: std::sync::Mutex<()>,
    /// The runtime background tasks run on, once started.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl ClusterManager {
    /// Build clusters from config; DNS resolution starts with [`ClusterManager::start`].
    pub fn new(configs: &[Arc<ClusterConfig>], stats: &Arc<Store>) -> Arc<Self> {
        let map = configs
            .iter()
            .map(|c| (c.name.clone(), Arc::new(Cluster::new(c.clone(), stats))))
            .collect();
        Arc::new(Self {
            clusters: arc_swap::ArcSwap::from_pointee(map),
            write: std::sync::Mutex::new(()),
            runtime: std::sync::OnceLock::new(),
        })
    }

    /// Start background work on the main runtime: one DNS refresh loop per STRICT_DNS
    /// cluster, the health checker of clusters with `health_checks` and the outlier sweep of
    /// clusters with `outlier_detection` (each ends when its cluster is dropped). Clusters
    /// added later start theirs in [`ClusterManager::start_cluster`].
    pub fn start(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        if self.runtime.set(rt.clone()).is_err() {
            return;
        }
        for c in self.clusters.load().values() {
            Self::spawn_tasks(c, rt);
        }
    }

    fn spawn_tasks(c: &Arc<Cluster>, rt: &tokio::runtime::Handle) {
        if c.config.needs_dns() {
            rt.spawn(dns::run(Arc::downgrade(c)));
        }
        if c.health.is_some() {
            rt.spawn(health::run(Arc::downgrade(c)));
        }
        if c.outlier.is_some() {
            rt.spawn(outlier::run(Arc::downgrade(c)));
        }
    }

    /// Start the background tasks of a cluster built outside the manager (a CDS cluster
    /// warming before [`ClusterManager::insert`]); a no-op before [`ClusterManager::start`]
    /// (`start` covers the clusters inserted by then).
    pub fn start_cluster(&self, c: &Arc<Cluster>) {
        if let Some(rt) = self.runtime.get() {
            Self::spawn_tasks(c, rt);
        }
    }

    /// Add or replace a cluster (by name); returns the one it replaced. New requests see it
    /// at once; requests in flight finish on the old one.
    pub fn insert(&self, c: Arc<Cluster>) -> Option<Arc<Cluster>> {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = (**self.clusters.load()).clone();
        let old = map.insert(c.name().to_string(), c);
        self.clusters.store(Arc::new(map));
        old
    }

    /// Remove a cluster by name; returns it. New requests for it get "no cluster" (503 NC).
    pub fn remove(&self, name: &str) -> Option<Arc<Cluster>> {
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = (**self.clusters.load()).clone();
        let old = map.remove(name);
        if old.is_some() {
            self.clusters.store(Arc::new(map));
        }
        old
    }

    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.clusters.load().len()
    }

    /// No clusters.
    pub fn is_empty(&self) -> bool {
        self.clusters.load().is_empty()
    }

    /// Resolves once every cluster is warm: its first DNS resolution was attempted (whether or
    /// not it succeeded) and, with health checks, every initial host had its first check.
    /// Listeners can wait on this so the first requests do not find a STRICT_DNS cluster empty
    /// or every host still pending its first health check. Call after
    /// [`ClusterManager::start`].
    pub async fn initialized(&self) {
        let clusters = self.clusters.load_full();
        for c in clusters.values() {
            c.warm().await;
        }
    }
    /// Look up a cluster for traffic by name.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(name).cloned()
    }

    /// Look up any cluster by name (same as [`ClusterManager::get`]; kept for the ADS client).
    pub fn get_any(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(name).cloned()
    }

    /// All clusters (for admin), sorted by name.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<_> = self.clusters.load().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }
}
