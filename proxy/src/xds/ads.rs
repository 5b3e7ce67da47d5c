//! The ADS stream: `StreamAggregatedResources` (state of the world) or
//! `DeltaAggregatedResources` (incremental) to the cluster named by
//! `ads_config.grpc_services[0].envoy_grpc.cluster_name`.
//!
//! One task on the main runtime owns the stream. It subscribes to every type that comes from
//! ADS in make-before-break order (CDS, EDS, LDS, RDS), hands each response to
//! [`Dynamic::apply`], and answers it: an ACK (the response's version and nonce) when every
//! resource applied, else a NACK (the previous accepted version, the nonce, and an
//! `error_detail` naming each rejected resource and field). When the clusters and listeners
//! it applied change which endpoints and route configs are needed, it updates the EDS/RDS
//! subscriptions on the same stream.
//!
//! When the stream fails, the last good config keeps serving; the task reconnects with
//! jittered exponential back-off (500 ms doubling to 30 s, as Envoy) and re-subscribes with
//! what it holds (SotW: the last accepted version per type; delta: `initial_resource_versions`),
//! so a restarted server resyncs it. `control_plane.connected_state` is 1 while a stream is up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use tokio_util::sync::CancellationToken;
use weir_xds_api::pb::envoy::config::core::v3::Node;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weir_xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use weir_xds_api::pb::google::rpc::Status as RpcStatus;

use super::dynamic::{Subscription, resource_name};
use super::{AdsConfig, CLUSTER, Dynamic, ENDPOINT, LISTENER, RESOURCE_WRAPPER, ROUTE, Resource};

/// Types requested on the stream, in order: make before break (clusters and endpoints, then
/// the secrets TLS contexts wait for, then listeners and routes).
const REQUEST_ORDER: [&str; 5] = [
    CLUSTER,
    ENDPOINT,
    weir_xds_api::type_urls::SECRET,
    LISTENER,
    ROUTE,
];
use crate::upstream::{ClusterManager, LbContext};

/// First reconnect delay (Envoy's default base interval).
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest message accepted from the server (a whole mesh's endpoints can be large).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// gRPC `INVALID_ARGUMENT`, the code of a NACK's error_detail.
const INVALID_ARGUMENT: i32 = 3;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("no host in the ADS cluster {0:?}")]
    NoHost(String),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("the server closed the stream")]
    Closed,
}

/// Run the ADS client until `stop`.
pub async fn run(
    dynamic: Arc<Dynamic>,
    ads: AdsConfig,
    clusters: Arc<ClusterManager>,
    node: Node,
    stop: CancellationToken,
) {
    let mut attempt: u32 = 0;
    loop {
        let mut healthy = false;
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = stream_once(&dynamic, &ads, &clusters, &node, &mut healthy) => r,
        };
        dynamic.stats().connected_state.set(0.0);
        if healthy {
            attempt = 0;
        }
        if let Err(e) = r {
            tracing::warn!(cluster = %ads.cluster, error = %e, "ADS stream failed; keeping the last good config");
            dynamic.update_failed(super::CLUSTER);
            dynamic.update_failed(super::LISTENER);
        }
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::debug!(?delay, "ADS reconnect back-off");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Full-jitter exponential back-off: uniform in [base/2, min(base * 2^attempt, max)].
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let lo = BACKOFF_BASE / 2;
    let span = cap.saturating_sub(lo).as_millis() as u64;
    lo + Duration::from_millis(rand::random_range(0..=span))
}

async fn connect(
    ads: &AdsConfig,
    clusters: &ClusterManager,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, StreamError> {
    let cluster = clusters
        .get_any(&ads.cluster)
        .ok_or_else(|| StreamError::NoHost(ads.cluster.clone()))?;
    let host = cluster
        .choose_host(&LbContext::default())
        .ok_or_else(|| StreamError::NoHost(ads.cluster.clone()))?;
    let scheme = if ads.tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", host.address))
            .map_err(StreamError::Connect)?
            .connect_timeout(cluster.config().connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
    if let Some(tls) = &ads.tls {
        let mut cfg = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
        cfg = if tls.sni.is_empty() {
            cfg.domain_name(host.address.ip().to_string())
        } else {
            cfg.domain_name(tls.sni.clone())
        };
        if let Some((chain, key)) = &tls.identity {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(chain, key));
        }
        endpoint = endpoint.tls_config(cfg)?;
    }
    let channel = endpoint.connect().await?;
    tracing::info!(cluster = %ads.cluster, address = %host.address, delta = ads.delta, "ADS stream connecting");
    Ok(AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

async fn stream_once(
    dynamic: &Arc<Dynamic>,
    ads: &AdsConfig,
    clusters: &ClusterManager,
    node: &Node,
    healthy: &mut bool,
) -> Result<(), StreamError> {
    let client = connect(ads, clusters).await?;
    if ads.delta {
        delta(dynamic, ads, client, node, healthy).await
    } else {
        sotw(dynamic, ads, client, node, healthy).await
    }
}

/// The request stream with `initial_metadata` attached (validated at config time; a pair
/// that still does not parse is skipped with a warning).
fn with_metadata<S>(stream: S, ads: &AdsConfig) -> tonic::Request<S> {
    let mut req = tonic::Request::new(stream);
    for (k, v) in &ads.initial_metadata {
        match (
            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>(),
        ) {
            (Ok(k), Ok(v)) => {
                req.metadata_mut().insert(k, v);
            }
            _ => {
                tracing::warn!(key = %k, "ADS initial_metadata entry skipped: not valid gRPC metadata")
            }
        }
    }
    req
}

/// The server accepted the stream.
fn stream_up(dynamic: &Dynamic, ads: &AdsConfig, protocol: &str) {
    dynamic.stats().connected_state.set(1.0);
    tracing::info!(cluster = %ads.cluster, protocol, "ADS stream up");
}

/// Per-type state of a state-of-the-world stream.
#[derive(Debug, Default)]
struct SotwType {
    /// Subscription last sent (`None`: never requested).
    sent: Option<Subscription>,
    /// Last nonce received.
    nonce: String,
}

struct NodeSender<'a> {
    node: &'a Node,
    once: bool,
    sent: bool,
}

impl<'a> NodeSender<'a> {
    fn new(node: &'a Node, ads: &AdsConfig) -> Self {
        Self {
            node,
            once: ads.set_node_on_first_message_only,
            sent: false,
        }
    }

    fn next(&mut self) -> Option<Node> {
        if self.once && self.sent {
            return None;
        }
        self.sent = true;
        Some(self.node.clone())
    }
}

async fn sotw(
    dynamic: &Arc<Dynamic>,
    ads: &AdsConfig,
    mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    node: &Node,
    healthy: &mut bool,
) -> Result<(), StreamError> {
    let (tx, rx) = mpsc::unbounded::<DiscoveryRequest>();
    let mut node_tx = NodeSender::new(node, ads);
    let mut types: BTreeMap<&'static str, SotwType> = BTreeMap::new();
    let mut subs = dynamic.subscribe();
    // The first requests go out before the call resolves (the server answers them).
    send_sotw_subscriptions(dynamic, &tx, &mut types, &mut node_tx);
    subs.mark_unchanged();
    let mut responses = client
        .stream_aggregated_resources(with_metadata(rx, ads))
        .await?
        .into_inner();
    stream_up(dynamic, ads, "state of the world");
    loop {
        tokio::select! {
            msg = responses.message() => {
                let Some(resp) = msg? else { return Err(StreamError::Closed) };
                *healthy = true;
                handle_sotw_response(dynamic, &tx, &mut types, &mut node_tx, resp);
                // Applying may have changed what EDS/RDS should ask for.
                send_sotw_subscriptions(dynamic, &tx, &mut types, &mut node_tx);
                subs.mark_unchanged();
            }
            r = subs.changed() => {
                if r.is_err() { return Err(StreamError::Closed) }
                send_sotw_subscriptions(dynamic, &tx, &mut types, &mut node_tx);
            }
        }
    }
}

fn send_sotw_subscriptions(
    dynamic: &Dynamic,
    tx: &mpsc::UnboundedSender<DiscoveryRequest>,
    types: &mut BTreeMap<&'static str, SotwType>,
    node_tx: &mut NodeSender<'_>,
) {
    for ty in REQUEST_ORDER {
        let want = dynamic.subscription(ty);
        let st = types.entry(ty).or_default();
        let want = match (want, &st.sent) {
            (Some(w), Some(s)) if &w == s => continue,
            (Some(w), _) => w,
            // No longer needed: an empty named subscription tells the server (Envoy does the
            // same when the last cluster/route using a name goes away).
            (None, Some(s)) if !s.wildcard && !s.names.is_empty() => Subscription::default(),
            (None, _) => continue,
        };
        let req = DiscoveryRequest {
            version_info: dynamic.version(ty).unwrap_or_default(),
            node: node_tx.next(),
            resource_names: want.names.iter().cloned().collect(),
            type_url: ty.to_string(),
            response_nonce: st.nonce.clone(),
            ..Default::default()
        };
        tracing::debug!(type_url = ty, names = ?want.names, "ADS subscribe");
        st.sent = Some(want);
        let _ = tx.unbounded_send(req);
    }
}

/// Unwrap `envoy.service.discovery.v3.Resource` wrappers and name every resource.
fn sotw_resources(resp: &DiscoveryResponse) -> Result<Vec<Resource>, Vec<String>> {
    let mut out = Vec::with_capacity(resp.resources.len());
    let mut errs = Vec::new();
    for any in &resp.resources {
        let body = if any.type_url == RESOURCE_WRAPPER {
            match weir_xds_api::unpack::<weir_xds_api::pb::envoy::service::discovery::v3::Resource>(
                any,
            )
            .map(|r| r.resource)
            {
                Ok(Some(b)) => b,
                Ok(None) => {
                    errs.push("a Resource wrapper without a resource".to_string());
                    continue;
                }
                Err(e) => {
                    errs.push(format!("cannot decode a Resource wrapper: {e}"));
                    continue;
                }
            }
        } else {
            any.clone()
        };
        match resource_name(&resp.type_url, &body) {
            Ok(name) => out.push(Resource {
                name,
                version: resp.version_info.clone(),
                body,
            }),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() { Ok(out) } else { Err(errs) }
}

fn handle_sotw_response(
    dynamic: &Arc<Dynamic>,
    tx: &mpsc::UnboundedSender<DiscoveryRequest>,
    types: &mut BTreeMap<&'static str, SotwType>,
    node_tx: &mut NodeSender<'_>,
    resp: DiscoveryResponse,
) {
    let Some(&ty) = REQUEST_ORDER.iter().find(|t| **t == resp.type_url) else {
        tracing::warn!(type_url = %resp.type_url, "ADS: response of a type weir did not ask for; ignored");
        return;
    };
    tracing::debug!(type_url = ty, version = %resp.version_info, resources = resp.resources.len(), "ADS response");
    let full_state = matches!(ty, super::LISTENER | super::CLUSTER);
    let result = match sotw_resources(&resp) {
        Ok(resources) => dynamic
            .apply(ty, &resp.version_info, resources, &[], full_state)
            .map_err(|e| e.to_string()),
        Err(errs) => {
            dynamic.update_failed(ty);
            Err(errs.join("\n"))
        }
    };
    let st = types.entry(ty).or_default();
    st.nonce = resp.nonce.clone();
    let req = DiscoveryRequest {
        version_info: dynamic.version(ty).unwrap_or_default(),
        node: node_tx.next(),
        resource_names: st
            .sent
            .as_ref()
            .map(|s| s.names.iter().cloned().collect())
            .unwrap_or_default(),
        type_url: ty.to_string(),
        response_nonce: resp.nonce,
        error_detail: result.err().map(|message| RpcStatus {
            code: INVALID_ARGUMENT,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    };
    if req.error_detail.is_some() {
        tracing::warn!(type_url = ty, version = %resp.version_info, "ADS: NACK");
    }
    let _ = tx.unbounded_send(req);
}

async fn delta(
    dynamic: &Arc<Dynamic>,
    ads: &AdsConfig,
    mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    node: &Node,
    healthy: &mut bool,
) -> Result<(), StreamError> {
    let (tx, rx) = mpsc::unbounded::<DeltaDiscoveryRequest>();
    let mut node_tx = NodeSender::new(node, ads);
    // Per type: the subscription the server knows about.
    let mut sent: BTreeMap<&'static str, Subscription> = BTreeMap::new();
    let mut subs = dynamic.subscribe();
    send_delta_subscriptions(dynamic, &tx, &mut sent, &mut node_tx);
    subs.mark_unchanged();
    let mut responses = client
        .delta_aggregated_resources(with_metadata(rx, ads))
        .await?
        .into_inner();
    stream_up(dynamic, ads, "delta");
    loop {
        tokio::select! {
            msg = responses.message() => {
                let Some(resp) = msg? else { return Err(StreamError::Closed) };
                *healthy = true;
                handle_delta_response(dynamic, &tx, &mut node_tx, resp);
                send_delta_subscriptions(dynamic, &tx, &mut sent, &mut node_tx);
                subs.mark_unchanged();
            }
            r = subs.changed() => {
                if r.is_err() { return Err(StreamError::Closed) }
                send_delta_subscriptions(dynamic, &tx, &mut sent, &mut node_tx);
            }
        }
    }
}

fn send_delta_subscriptions(
    dynamic: &Dynamic,
    tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    sent: &mut BTreeMap<&'static str, Subscription>,
    node_tx: &mut NodeSender<'_>,
) {
    for ty in REQUEST_ORDER {
        let want = dynamic.subscription(ty).unwrap_or_default();
        let had = sent.get(ty);
        let first = had.is_none();
        if first && !want.wildcard && want.names.is_empty() {
            continue;
        }
        let empty = Subscription::default();
        let had = had.unwrap_or(&empty);
        if !first && *had == want {
            continue;
        }
        let subscribe: Vec<String> = want.names.difference(&had.names).cloned().collect();
        let unsubscribe: Vec<String> = had.names.difference(&want.names).cloned().collect();
        let mut req = DeltaDiscoveryRequest {
            node: node_tx.next(),
            type_url: ty.to_string(),
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            ..Default::default()
        };
        if first {
            if want.wildcard {
                req.resource_names_subscribe = vec!["*".to_string()];
            }
            // What this client already holds, so a restarted server sends only changes.
            let held = dynamic.resource_versions(ty);
            let names: BTreeSet<&String> = want.names.iter().collect();
            req.initial_resource_versions = held
                .into_iter()
                .filter(|(n, _)| want.wildcard || names.contains(n))
                .collect();
        }
        tracing::debug!(type_url = ty, subscribe = ?req.resource_names_subscribe, unsubscribe = ?req.resource_names_unsubscribe, "ADS delta subscribe");
        sent.insert(ty, want);
        let _ = tx.unbounded_send(req);
    }
}

fn handle_delta_response(
    dynamic: &Arc<Dynamic>,
    tx: &mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    node_tx: &mut NodeSender<'_>,
    resp: DeltaDiscoveryResponse,
) {
    let Some(&ty) = REQUEST_ORDER.iter().find(|t| **t == resp.type_url) else {
        tracing::warn!(type_url = %resp.type_url, "ADS: delta response of a type weir did not ask for; ignored");
        return;
    };
    tracing::debug!(
        type_url = ty,
        version = %resp.system_version_info,
        resources = resp.resources.len(),
        removed = resp.removed_resources.len(),
        "ADS delta response"
    );
    let mut resources = Vec::with_capacity(resp.resources.len());
    let mut errs = Vec::new();
    for r in resp.resources {
        match r.resource {
            Some(body) => resources.push(Resource {
                name: r.name,
                version: r.version,
                body,
            }),
            None => errs.push(format!("resource {:?} has no body", r.name)),
        }
    }
    let version = if resp.system_version_info.is_empty() {
        resp.nonce.clone()
    } else {
        resp.system_version_info.clone()
    };
    let result = dynamic
        .apply(ty, &version, resources, &resp.removed_resources, false)
        .map_err(|e| e.0);
    if let Err(e) = result {
        errs.extend(e);
    }
    let req = DeltaDiscoveryRequest {
        node: node_tx.next(),
        type_url: ty.to_string(),
        response_nonce: resp.nonce,
        error_detail: (!errs.is_empty()).then(|| RpcStatus {
            code: INVALID_ARGUMENT,
            message: errs.join("\n"),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    if req.error_detail.is_some() {
        tracing::warn!(type_url = ty, "ADS: delta NACK");
    }
    let _ = tx.unbounded_send(req);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in [0, 1, 5, 30, u32::MAX] {
            for _ in 0..100 {
                let d = backoff(attempt);
                assert!(d >= BACKOFF_BASE / 2, "{d:?}");
                assert!(d <= BACKOFF_MAX, "{d:?}");
            }
        }
        assert!(backoff(0) <= BACKOFF_BASE);
        // With 20 draws at a high attempt, at least one is well above the base.
        assert!((0..20).any(|_| backoff(10) > BACKOFF_BASE * 4));
    }
}
