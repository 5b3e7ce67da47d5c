//! The seam through which filters fetch over HTTP from an upstream cluster (remote JWKS):
//! [`UpstreamFetch`], implemented by the proxy over its cluster manager and connection pools
//! (`proxy/src/upstream/fetch.rs`) and reached at request time through
//! [`ServerInfo::upstream_fetch`](crate::ServerInfo::upstream_fetch).
//!
//! Why at request time and not in the [`FactoryContext`](crate::FactoryContext): filters are
//! translated before the cluster manager exists (bootstrap) and clusters come and go by CDS;
//! the fetcher looks the cluster up by name on every fetch, as Envoy's `JwksFetcher` does.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

/// One GET through a cluster.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// The cluster to send it through.
    pub cluster: String,
    /// The absolute URI (`http://host/path`); its authority becomes the `host` header.
    pub uri: http::Uri,
    /// Bound on the whole exchange (connect, headers, body).
    pub timeout: Duration,
    /// Bound on the body; a longer body fails the fetch.
    pub max_body: usize,
}

/// The upstream's answer.
#[derive(Debug, Clone)]
pub struct FetchResponse {
    /// HTTP status.
    pub status: http::StatusCode,
    /// The whole body.
    pub body: Bytes,
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No cluster of that name.
    #[error("cluster {0} not found")]
    NoCluster(String),
    /// The cluster has no healthy host.
    #[error("no healthy upstream in cluster {0}")]
    NoHealthyUpstream(String),
    /// The cluster's circuit breaker is open.
    #[error("cluster {0} overflowed")]
    Overflow(String),
    /// The timeout passed.
    #[error("timed out")]
    Timeout,
    /// The body was longer than `max_body`.
    #[error("body longer than {0} bytes")]
    TooLarge(usize),
    /// Connect failed, reset, or protocol error.
    #[error("upstream: {0}")]
    Upstream(String),
}

/// A boxed fetch.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<FetchResponse, FetchError>> + Send>>;

/// Async GET through a named cluster, bounded in time and size.
pub trait UpstreamFetch: Send + Sync + std::fmt::Debug {
    /// Send `req`; the future is `'static` so a filter can await it in a pause.
    fn fetch(&self, req: FetchRequest) -> FetchFuture;
}
