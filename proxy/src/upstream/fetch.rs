//! [`weir_filters::fetch::UpstreamFetch`] over the cluster manager: the GETs filters make
//! through a cluster (remote JWKS for `jwt_authn`), as Envoy's `AsyncClient` does.
//!
//! Per fetch: look the cluster up by name (so a cluster added or replaced by CDS is used at
//! once), pick a host with the cluster's load balancer, take a request slot from its circuit
//! breaker (`upstream_rq_pending_overflow` when full), and send `GET <path>` with
//! `host: <uri authority>` over the worker's pool; the response body is read up to
//! `max_body`. The whole exchange is bounded by the request's timeout. Cluster stats
//! (`upstream_rq_total`, `upstream_rq_<code>`-class via `report`) count these requests like the
//! router's; the host's outlier detection sees the result.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Version};
use http_body_util::BodyExt;
use weir_filters::fetch::{FetchError, FetchFuture, FetchRequest, FetchResponse, UpstreamFetch};

use super::circuit::Priority;
use super::{ClusterManager, HostResult, LbContext, UpstreamError};

impl UpstreamFetch for ClusterManager {
    fn fetch(&self, req: FetchRequest) -> FetchFuture {
        let cluster = self.get(&req.cluster);
        Box::pin(async move {
            let Some(cluster) = cluster else {
                return Err(FetchError::NoCluster(req.cluster));
            };
            let timeout = req.timeout;
            let exchange = async move {
                let Some(host) = cluster.choose_host(&LbContext::default()) else {
                    return Err(FetchError::NoHealthyUpstream(req.cluster));
                };
                let rm = cluster.resources(Priority::Default);
                let Some(_slot) = rm.requests.try_acquire() else {
                    cluster.stats().upstream_rq_pending_overflow.increment(1);
                    return Err(FetchError::Overflow(req.cluster));
                };
                let path = req
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                let mut up = Request::new(weir_filters::body::empty());
                *up.method_mut() = Method::GET;
                *up.version_mut() = Version::HTTP_11;
                *up.uri_mut() = path
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| FetchError::Upstream(e.to_string()))?;
                if let Some(a) = req.uri.authority()
                    && let Ok(v) = HeaderValue::from_str(a.as_str())
                {
                    up.headers_mut().insert(http::header::HOST, v);
                }
                let stats = cluster.stats();
                stats.upstream_rq_total.increment(1);
                let resp = match cluster.send_http(&host, up, false, Priority::Default).await {
                    Ok(r) => r,
                    Err(e) => {
                        let result = match &e {
                            UpstreamError::ConnectTimeout | UpstreamError::ConnectFailure(_) => {
                                HostResult::ConnectFailed
                            }
                            _ => HostResult::Reset,
                        };
                        cluster.report(&host, result);
                        return Err(FetchError::Upstream(e.to_string()));
                    }
                };
                let status = resp.status();
                cluster.report(&host, HostResult::Status(status.as_u16()));
                let mut body = resp.into_body();
                let mut buf = BytesMut::new();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| FetchError::Upstream(e.to_string()))?;
                    if let Ok(data) = frame.into_data() {
                        if buf.len() + data.len() > req.max_body {
                            return Err(FetchError::TooLarge(req.max_body));
                        }
                        buf.extend_from_slice(&data);
                    }
                }
                Ok(FetchResponse {
                    status,
                    body: Bytes::from(buf),
                })
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(FetchError::Timeout))
        })
    }
}

/// The fetcher for a server: its cluster manager.
pub fn fetcher(clusters: &Arc<ClusterManager>) -> Arc<dyn UpstreamFetch> {
    clusters.clone()
}
