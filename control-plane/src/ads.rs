//! `envoy.service.discovery.v3.AggregatedDiscoveryService`: state-of-the-world
//! (`StreamAggregatedResources`) and incremental (`DeltaAggregatedResources`) ADS.
//!
//! Each stream is one task owning its protocol state; it wakes on a client request or on a
//! cache generation change ([`crate::cache::SnapshotCache::subscribe`]) and answers from the
//! node's current snapshot. Semantics follow the xDS protocol as Envoy and go-control-plane
//! implement it:
//!
//! - **Node**: required on the first request of a stream (`InvalidArgument` otherwise); later
//!   requests may omit it (`set_node_on_first_message_only`), and a different node on a later
//!   request is ignored.
//! - **Nonces** are per stream (a counter); each response carries a new one, and the stream
//!   remembers the last one per type. A request whose `response_nonce` is set but is not the
//!   latest for its type is *stale*: in SotW it is ignored entirely (counted in
//!   `weir_cp_xds_stale_requests_total`); in delta its subscription changes still apply (they
//!   are deltas and must not be lost) but it is not counted as an ACK or NACK.
//! - **ACK / NACK**: a current-nonce request without `error_detail` ACKs the version sent with
//!   that nonce; with `error_detail` it is a NACK, logged, counted and recorded per node
//!   ([`crate::status`]) with the rejected version and the client's message. The server keeps
//!   serving the last config (it does not resend the rejected one; the next change is pushed
//!   as usual).
//! - **Subscriptions** (SotW): `resource_names` replaces the type's subscription; an empty list
//!   for LDS/CDS, or `*`, is a wildcard (every resource); for other types an empty list means
//!   none. A response carries the subscribed resources that exist; its `version_info` is a hash
//!   of exactly those (name, version) pairs, so a change to a resource the client did not
//!   subscribe to pushes nothing. The first request of a type is always answered (possibly
//!   with no resources), except that a wildcard request whose `version_info` already equals
//!   the current version (a reconnecting client that is up to date) waits for a change.
//! - **Subscriptions** (delta): `resource_names_subscribe` / `_unsubscribe` adjust the set;
//!   `*` subscribes to / leaves the wildcard; an empty first subscription is the legacy
//!   wildcard. `initial_resource_versions` on the first request of a type tells the server
//!   what the client already has: equal versions are not resent, names that no longer exist
//!   come back in `removed_resources`. Each resource carries its content hash as `version`,
//!   `system_version_info` is the type's version. A resource that disappears, or that the
//!   client unsubscribes from while holding it, is sent in `removed_resources`.
//! - **Pushes only on change**, per stream and type (SotW: the response version; delta: each
//!   resource's version), and in make-before-break order when several types change at once:
//!   CDS, EDS, LDS, RDS, then SDS ([`crate::resource::PUSH_ORDER`]).
//! - Types weir-cp does not serve are ignored (no response), as go-control-plane does.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use weir_xds_api::pb::envoy::config::core::v3::{ControlPlane, Node};
use weir_xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as PbResource, aggregated_discovery_service_server::AggregatedDiscoveryService,
};

use crate::cache::{NodeMeta, Snapshot, SnapshotCache};
use crate::metrics::{Metrics, Protocol};
use crate::resource::{Fnv, PUSH_ORDER, Resource, is_served_type, short_name, sotw_wildcard_type};
use crate::status::{NackRecord, StatusRegistry, StreamStatus, now_ms};

/// Responses buffered per stream before the stream task waits for the client to read.
const STREAM_BUFFER: usize = 16;

/// The `control_plane.identifier` sent in responses.
pub const CONTROL_PLANE_ID: &str = "weir-cp";

/// The ADS service.
#[derive(Debug, Clone)]
pub struct AdsService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cache: Arc<SnapshotCache>,
    metrics: Arc<Metrics>,
    status: Arc<StatusRegistry>,
    shutdown: CancellationToken,
    next_stream: AtomicU64,
    /// The mesh CA, deciding each stream's workload identity ([`NodeMeta::workload`]).
    ca: Option<Arc<crate::ca::CaSource>>,
}

impl AdsService {
    /// A service answering from `cache`. Streams end when `shutdown` is cancelled.
    pub fn new(
        cache: Arc<SnapshotCache>,
        metrics: Arc<Metrics>,
        status: Arc<StatusRegistry>,
        shutdown: CancellationToken,
    ) -> Self {
        AdsService {
            inner: Arc::new(Inner {
                cache,
                metrics,
                status,
                shutdown,
                next_stream: AtomicU64::new(1),
                ca: None,
            }),
        }
    }

    /// Let `ca` decide which workload identity each stream may obtain a certificate for
    /// (call before cloning the service).
    pub fn with_ca(mut self, ca: Arc<crate::ca::CaSource>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ca = Some(ca);
        }
        self
    }
}

/// Who opened a stream: its address and the credential the auth layer established.
#[derive(Debug, Clone, Default)]
struct Caller {
    peer: Option<String>,
    identity: Option<crate::auth::Identity>,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Self {
        Caller {
            peer: request.remote_addr().map(|a| a.to_string()),
            identity: request.extensions().get::<crate::auth::Identity>().cloned(),
        }
    }
}

type ResponseStream<T> = tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<T, Status>>;

fn node_meta(node: &Node, inner: &Inner, caller: &Caller) -> NodeMeta {
    // No auth layer in front (embedded uses, tests) counts as open.
    let workload = inner.ca.as_ref().and_then(|ca| {
        let (open, patterns) = match &caller.identity {
            None => (true, &[][..]),
            Some(id) => (
                id.method == crate::auth::Method::Open,
                id.workloads.as_slice(),
            ),
        };
        ca.entitled(node.metadata.as_ref(), open, patterns, &node.id)
    });
    NodeMeta {
        id: node.id.clone(),
        cluster: node.cluster.clone(),
        workload,
    }
}

fn control_plane() -> Option<ControlPlane> {
    Some(ControlPlane {
        identifier: CONTROL_PLANE_ID.into(),
    })
}

/// Hash over (name, version) pairs in name order: the SotW response version. For a wildcard
/// subscription it equals the type's version.
fn version_of<'a>(items: impl Iterator<Item = &'a Arc<Resource>>) -> String {
    let mut h = Fnv::default();
    for r in items {
        h.field(r.name.as_bytes());
        h.field(r.version.as_bytes());
    }
    h.hex()
}

/// Why a stream's response is being computed (for push latency).
#[derive(Clone, Copy)]
enum Trigger {
    Request,
    Change,
}

/// What the stream task needs besides its protocol state.
struct StreamCtx {
    inner: Arc<Inner>,
    node: NodeMeta,
    status: StreamStatus,
    protocol: Protocol,
    nonce: u64,
}

impl StreamCtx {
    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.cache.snapshot(&self.node)
    }

    fn record_push(&self, snap: &Snapshot, trigger: Trigger, type_url: &str, n: usize, rm: usize) {
        self.inner.metrics.pushed(type_url, n, rm);
        if let Trigger::Change = trigger {
            self.inner
                .metrics
                .push_latency
                .observe(Instant::now().saturating_duration_since(snap.changed_at));
        }
    }

    fn nack(&self, type_url: &str, version: &str, nonce: &str, code: i32, message: &str) {
        self.inner.metrics.nack(type_url);
        tracing::warn!(
            node = %self.node.id,
            cluster = %self.node.cluster,
            r#type = short_name(type_url),
            %version,
            error = %message,
            "xDS NACK: the client rejected the config (it keeps its previous one)"
        );
        self.status.nacked(
            type_url,
            NackRecord {
                version: version.into(),
                nonce: nonce.into(),
                code,
                message: message.into(),
                at_ms: now_ms(),
            },
        );
    }
}

/// Open a stream: wait for the first request, check the node, register.
async fn open<Req: FirstRequest>(
    inner: &Arc<Inner>,
    requests: &mut Streaming<Req>,
    protocol: Protocol,
    caller: Caller,
) -> Result<Option<(StreamCtx, Req)>, Status> {
    let peer = caller.peer.clone();
    let first = tokio::select! {
        _ = inner.shutdown.cancelled() => return Ok(None),
        m = requests.message() => match m? {
            Some(m) => m,
            None => return Ok(None),
        },
    };
    let Some(node) = first.node() else {
        return Err(Status::invalid_argument(
            "the first request of an xDS stream must carry the node",
        ));
    };
    let node = node_meta(node, inner, &caller);
    let id = inner.next_stream.fetch_add(1, Ordering::Relaxed);
    let status = inner
        .status
        .register(id, &node.id, &node.cluster, protocol, peer.clone());
    inner.metrics.stream_opened(protocol);
    tracing::info!(
        node = %node.id,
        cluster = %node.cluster,
        protocol = protocol.as_str(),
        peer = peer.as_deref().unwrap_or("-"),
        workload = node.workload.as_deref().unwrap_or("-"),
        stream = id,
        "xDS client connected"
    );
    Ok(Some((
        StreamCtx {
            inner: inner.clone(),
            node,
            status,
            protocol,
            nonce: 0,
        },
        first,
    )))
}

impl Drop for StreamCtx {
    fn drop(&mut self) {
        self.inner.metrics.stream_closed(self.protocol);
        tracing::info!(
            node = %self.node.id,
            cluster = %self.node.cluster,
            protocol = self.protocol.as_str(),
            "xDS client disconnected"
        );
    }
}

trait FirstRequest {
    fn node(&self) -> Option<&Node>;
}

impl FirstRequest for DiscoveryRequest {
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
}

impl FirstRequest for DeltaDiscoveryRequest {
    fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }
}

#[tonic::codegen::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let caller = Caller::of(&request);
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(status) = run::<Sotw>(inner, requests, tx.clone(), caller).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ResponseStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = Caller::of(&request);
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(status) = run::<Delta>(inner, requests, tx.clone(), caller).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ResponseStream::new(rx)))
    }
}

/// The stream ended normally (client closed, or the server is shutting down).
struct Closed;

// ---------------------------------------------------------------------------------------------
// State of the world

#[derive(Debug, Default)]
struct SotwType {
    wildcard: bool,
    names: BTreeSet<String>,
    /// (version, nonce) of the last response.
    sent: Option<(String, String)>,
    /// A wildcard request said it already has this version: do not answer it until it changes.
    client_has: Option<String>,
}

/// What differs between the state-of-the-world and the delta protocol; [`run`] is the stream
/// loop both share.
trait Flavor {
    const PROTOCOL: Protocol;
    type Req: FirstRequest + Send + 'static;
    type Resp: Send + 'static;
    /// Per-type subscription state.
    type State: Default + Send;

    /// Handle one request of the stream.
    fn request<'a>(
        ctx: &'a mut StreamCtx,
        types: &'a mut HashMap<String, Self::State>,
        req: Self::Req,
        tx: &'a mpsc::Sender<Result<Self::Resp, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a;

    /// Push what changed for one subscribed type after a config change.
    fn respond<'a>(
        ctx: &'a mut StreamCtx,
        type_url: &'a str,
        st: &'a mut Self::State,
        snap: &'a Snapshot,
        tx: &'a mpsc::Sender<Result<Self::Resp, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a;
}

/// State of the world (`StreamAggregatedResources`).
struct Sotw;

impl Flavor for Sotw {
    const PROTOCOL: Protocol = Protocol::Sotw;
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    type State = SotwType;

    fn request<'a>(
        ctx: &'a mut StreamCtx,
        types: &'a mut HashMap<String, SotwType>,
        req: DiscoveryRequest,
        tx: &'a mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a {
        sotw_request(ctx, types, req, tx)
    }

    fn respond<'a>(
        ctx: &'a mut StreamCtx,
        type_url: &'a str,
        st: &'a mut SotwType,
        snap: &'a Snapshot,
        tx: &'a mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a {
        sotw_respond(ctx, type_url, st, snap, Trigger::Change, tx)
    }
}

/// Incremental (`DeltaAggregatedResources`).
struct Delta;

impl Flavor for Delta {
    const PROTOCOL: Protocol = Protocol::Delta;
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    type State = DeltaType;

    fn request<'a>(
        ctx: &'a mut StreamCtx,
        types: &'a mut HashMap<String, DeltaType>,
        req: DeltaDiscoveryRequest,
        tx: &'a mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a {
        delta_request(ctx, types, req, tx)
    }

    fn respond<'a>(
        ctx: &'a mut StreamCtx,
        type_url: &'a str,
        st: &'a mut DeltaType,
        snap: &'a Snapshot,
        tx: &'a mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> impl Future<Output = Result<(), Closed>> + Send + 'a {
        delta_respond(ctx, type_url, st, snap, Trigger::Change, tx)
    }
}

/// One ADS stream: the first request opens it (node, snapshot group), then requests and
/// config changes are handled as they come until the client closes, the server shuts down or
/// a read fails (e.g. a message over the size limit ends the stream with that status).
async fn run<F: Flavor>(
    inner: Arc<Inner>,
    mut requests: Streaming<F::Req>,
    tx: mpsc::Sender<Result<F::Resp, Status>>,
    caller: Caller,
) -> Result<(), Status> {
    let Some((mut ctx, first)) = open(&inner, &mut requests, F::PROTOCOL, caller).await? else {
        return Ok(());
    };
    let mut gen_rx = inner.cache.subscribe();
    gen_rx.borrow_and_update();
    let mut types: HashMap<String, F::State> = HashMap::new();
    if F::request(&mut ctx, &mut types, first, &tx).await.is_err() {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return Ok(()),
            m = requests.message() => match m {
                Ok(Some(req)) => {
                    if F::request(&mut ctx, &mut types, req, &tx).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(node = %ctx.node.id, error = %e, "xDS stream read error");
                    return Err(e);
                }
            },
            changed = gen_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let snap = ctx.snapshot();
                for t in PUSH_ORDER {
                    if let Some(st) = types.get_mut(*t)
                        && F::respond(&mut ctx, t, st, &snap, &tx).await.is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
}

async fn sotw_request(
    ctx: &mut StreamCtx,
    types: &mut HashMap<String, SotwType>,
    req: DiscoveryRequest,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Closed> {
    let type_url = req.type_url.as_str();
    if !is_served_type(type_url) {
        tracing::debug!(node = %ctx.node.id, %type_url, "ignoring request for an unserved type");
        return Ok(());
    }
    let first_of_type = !types.contains_key(type_url);
    let st = types.entry(type_url.to_string()).or_default();
    if !req.response_nonce.is_empty() {
        let current = st.sent.as_ref().map(|(_, n)| n.as_str());
        if current != Some(req.response_nonce.as_str()) {
            ctx.inner.metrics.stale(type_url);
            tracing::debug!(
                node = %ctx.node.id,
                r#type = short_name(type_url),
                nonce = %req.response_nonce,
                "ignoring a request with a stale nonce"
            );
            return Ok(());
        }
        let sent_version = st.sent.as_ref().map(|(v, _)| v.clone()).unwrap_or_default();
        if let Some(err) = &req.error_detail {
            ctx.nack(
                type_url,
                &sent_version,
                &req.response_nonce,
                err.code,
                &err.message,
            );
        } else if req.version_info == sent_version {
            ctx.inner.metrics.ack(type_url);
            ctx.status.acked(type_url, &sent_version);
        }
    }
    let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
    st.wildcard = names.contains("*") || (names.is_empty() && sotw_wildcard_type(type_url));
    st.names = names;
    st.names.remove("*");
    if first_of_type && st.wildcard && !req.version_info.is_empty() {
        st.client_has = Some(req.version_info.clone());
    }
    let snap = ctx.snapshot();
    sotw_respond(ctx, type_url, st, &snap, Trigger::Request, tx).await
}

async fn sotw_respond(
    ctx: &mut StreamCtx,
    type_url: &str,
    st: &mut SotwType,
    snap: &Snapshot,
    trigger: Trigger,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Closed> {
    let tr = snap.of(type_url);
    let included: Vec<&Arc<Resource>> = if st.wildcard {
        tr.items.values().collect()
    } else {
        st.names.iter().filter_map(|n| tr.items.get(n)).collect()
    };
    let version = version_of(included.iter().copied());
    if let Some(has) = st.client_has.take()
        && has == version
        && st.sent.is_none()
    {
        // Up to date from an earlier stream: remember it as sent without a nonce.
        st.sent = Some((version, String::new()));
        return Ok(());
    }
    if st.sent.as_ref().is_some_and(|(v, _)| *v == version) {
        return Ok(());
    }
    let nonce = ctx.next_nonce();
    let n = included.len();
    let resp = DiscoveryResponse {
        version_info: version.clone(),
        resources: included.iter().map(|r| r.any.clone()).collect(),
        type_url: type_url.to_string(),
        nonce: nonce.clone(),
        control_plane: control_plane(),
        ..Default::default()
    };
    tx.send(Ok(resp)).await.map_err(|_| Closed)?;
    ctx.record_push(snap, trigger, type_url, n, 0);
    ctx.status.sent(type_url, &version);
    tracing::debug!(
        node = %ctx.node.id,
        r#type = short_name(type_url),
        %version,
        %nonce,
        resources = n,
        "xDS response sent"
    );
    st.sent = Some((version, nonce));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Delta

#[derive(Debug, Default)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client has: name -> version.
    known: HashMap<String, String>,
    /// Nonce and system version of the last response.
    sent: Option<(String, String)>,
    responded: bool,
}

impl DeltaType {
    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

async fn delta_request(
    ctx: &mut StreamCtx,
    types: &mut HashMap<String, DeltaType>,
    req: DeltaDiscoveryRequest,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> Result<(), Closed> {
    let type_url = req.type_url.as_str();
    if !is_served_type(type_url) {
        tracing::debug!(node = %ctx.node.id, %type_url, "ignoring request for an unserved type");
        return Ok(());
    }
    let st = match types.get_mut(type_url) {
        Some(st) => st,
        None => {
            let st = types.entry(type_url.to_string()).or_default();
            st.wildcard = req.resource_names_subscribe.is_empty();
            st.known = req.initial_resource_versions.clone();
            st
        }
    };
    if !req.response_nonce.is_empty() {
        match &st.sent {
            Some((nonce, version)) if *nonce == req.response_nonce => {
                let version = version.clone();
                if let Some(err) = &req.error_detail {
                    ctx.nack(
                        type_url,
                        &version,
                        &req.response_nonce,
                        err.code,
                        &err.message,
                    );
                } else {
                    ctx.inner.metrics.ack(type_url);
                    ctx.status.acked(type_url, &version);
                }
            }
            _ => {
                ctx.inner.metrics.stale(type_url);
                tracing::debug!(
                    node = %ctx.node.id,
                    r#type = short_name(type_url),
                    nonce = %req.response_nonce,
                    "stale nonce: subscription changes apply, ACK/NACK ignored"
                );
            }
        }
    }
    for n in &req.resource_names_subscribe {
        if n == "*" {
            st.wildcard = true;
        } else {
            st.names.insert(n.clone());
        }
    }
    for n in &req.resource_names_unsubscribe {
        if n == "*" {
            st.wildcard = false;
        } else {
            st.names.remove(n);
        }
    }
    let snap = ctx.snapshot();
    delta_respond(ctx, type_url, st, &snap, Trigger::Request, tx).await
}

async fn delta_respond(
    ctx: &mut StreamCtx,
    type_url: &str,
    st: &mut DeltaType,
    snap: &Snapshot,
    trigger: Trigger,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> Result<(), Closed> {
    let tr = snap.of(type_url);
    let mut updates: Vec<&Arc<Resource>> = Vec::new();
    for (name, r) in &tr.items {
        if st.wants(name) && st.known.get(name) != Some(&r.version) {
            updates.push(r);
        }
    }
    // Held by the client but gone from the snapshot, or no longer subscribed to.
    let mut removed: BTreeSet<String> = BTreeSet::new();
    for name in st.known.keys() {
        if !st.wants(name) || !tr.items.contains_key(name) {
            removed.insert(name.clone());
        }
    }
    let first_wildcard = !st.responded && st.wildcard;
    if updates.is_empty() && removed.is_empty() && !first_wildcard {
        return Ok(());
    }
    let nonce = ctx.next_nonce();
    let resp = DeltaDiscoveryResponse {
        system_version_info: tr.version.clone(),
        resources: updates
            .iter()
            .map(|r| PbResource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect(),
        type_url: type_url.to_string(),
        removed_resources: removed.iter().cloned().collect(),
        nonce: nonce.clone(),
        control_plane: control_plane(),
        ..Default::default()
    };
    tx.send(Ok(resp)).await.map_err(|_| Closed)?;
    ctx.record_push(snap, trigger, type_url, updates.len(), removed.len());
    ctx.status.sent(type_url, &tr.version);
    tracing::debug!(
        node = %ctx.node.id,
        r#type = short_name(type_url),
        %nonce,
        updated = updates.len(),
        removed = removed.len(),
        "delta xDS response sent"
    );
    for r in updates {
        st.known.insert(r.name.clone(), r.version.clone());
    }
    for name in &removed {
        st.known.remove(name);
    }
    st.sent = Some((nonce, tr.version.clone()));
    st.responded = true;
    Ok(())
}
