//! The cluster manager: clusters (STATIC, STRICT_DNS), their host sets, load balancing, and
//! per-worker upstream connection pools (HTTP/1.1, HTTP/2) and TCP connects.
//!
//! OWNER: upstream helper. Interface used by `http::router` and `listener::tcp_proxy`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use metrics::{Counter, Gauge, Histogram};
use weir_xds_api::pb::envoy::config::cluster::v3::Cluster as PbCluster;

use crate::config::Errors;
use crate::stats::{Scope, Store};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type sent upstream (streams the downstream body through).
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Translated cluster config.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `name`.
    pub name: String,
}

/// Translate and validate one `Cluster`.
pub fn translate_cluster(c: &PbCluster, path: &str, errs: &mut Errors) -> Option<ClusterConfig> {
    let _ = (path, errs);
    Some(ClusterConfig {
        name: c.name.clone(),
    })
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
    /// `upstream_cx_total`.
    pub upstream_cx_total: Counter,
    /// `upstream_cx_active`.
    pub upstream_cx_active: Gauge,
    /// `upstream_cx_connect_fail`.
    pub upstream_cx_connect_fail: Counter,
    /// `upstream_cx_connect_timeout`.
    pub upstream_cx_connect_timeout: Counter,
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
            upstream_cx_total: scope.counter("upstream_cx_total"),
            upstream_cx_active: scope.gauge("upstream_cx_active"),
            upstream_cx_connect_fail: scope.counter("upstream_cx_connect_fail"),
            upstream_cx_connect_timeout: scope.counter("upstream_cx_connect_timeout"),
        }
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    config: Arc<ClusterConfig>,
    stats: ClusterStats,
}

impl Cluster {
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

    /// The current host set (all priorities, in config order).
    pub fn hosts(&self) -> Arc<Vec<Arc<Host>>> {
        Arc::new(Vec::new())
    }

    /// Pick a host with the cluster's load balancer (per-worker state, no shared lock).
    pub fn choose_host(&self) -> Option<Arc<Host>> {
        None
    }

    /// Send a request to `host` on this worker's pool. The request URI is origin-form or
    /// absolute; the pool sets the upstream framing (h1 or h2 per cluster protocol options and
    /// `downstream_h2` for `use_downstream_protocol_config`).
    pub async fn send_http(
        &self,
        host: &Arc<Host>,
        req: http::Request<UpstreamBody>,
        downstream_h2: bool,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let _ = (host, req, downstream_h2);
        Err(UpstreamError::NoHealthyUpstream)
    }

    /// Open a TCP connection to `host` (connect_timeout applied, cx stats counted).
    pub async fn connect_tcp(
        &self,
        host: &Arc<Host>,
    ) -> Result<tokio::net::TcpStream, UpstreamError> {
        let _ = host;
        Err(UpstreamError::NoHealthyUpstream)
    }
}

/// All clusters.
#[derive(Debug)]
pub struct ClusterManager {
    clusters: arc_swap::ArcSwap<std::collections::HashMap<String, Arc<Cluster>>>,
}

impl ClusterManager {
    /// Build clusters from config; DNS resolution starts with [`ClusterManager::start`].
    pub fn new(configs: &[Arc<ClusterConfig>], stats: &Arc<Store>) -> Arc<Self> {
        let map = configs
            .iter()
            .map(|c| {
                let stats = ClusterStats::new(&stats.cluster(&c.name));
                (
                    c.name.clone(),
                    Arc::new(Cluster {
                        config: c.clone(),
                        stats,
                    }),
                )
            })
            .collect();
        Arc::new(Self {
            clusters: arc_swap::ArcSwap::from_pointee(map),
        })
    }

    /// Start background work (DNS refresh) on the main runtime.
    pub fn start(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let _ = rt;
    }

    /// Look up a cluster by name.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(name).cloned()
    }

    /// All clusters (for admin), sorted by name.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<_> = self.clusters.load().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }
}
