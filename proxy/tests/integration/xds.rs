//! weir as an xDS client, against a scripted ADS server (a real tonic gRPC server whose
//! responses the test sends and whose requests — ACKs, NACKs, subscriptions — it asserts).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use http::StatusCode;
use tonic::{Request, Response, Status, Streaming};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::config::cluster::v3::Cluster;
use weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weir_xds_api::pb::envoy::config::listener::v3::Listener;
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weir_xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as DeltaResource,
};

use crate::harness::*;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// How long a test waits for the proxy to send the next request.
const WAIT: Duration = Duration::from_secs(10);

type RespTx<T> = mpsc::UnboundedSender<Result<T, Status>>;

/// The next request of type `ty` from `requests`, keeping requests of other types in `stash`
/// (and serving from it first).
async fn next_of<R>(
    requests: &mut mpsc::UnboundedReceiver<R>,
    stash: &mut VecDeque<R>,
    ty: &str,
    type_of: fn(&R) -> &str,
) -> R {
    if let Some(i) = stash.iter().position(|r| type_of(r) == ty) {
        return stash.remove(i).expect("stashed");
    }
    loop {
        let r = tokio::time::timeout(WAIT, requests.next())
            .await
            .unwrap_or_else(|_| panic!("no {ty} request within {WAIT:?}"))
            .expect("stream open");
        if type_of(&r) == ty {
            return r;
        }
        stash.push_back(r);
    }
}

/// One SotW stream as the server sees it.
struct SotwStream {
    /// The stream's gRPC metadata (headers).
    metadata: tonic::metadata::MetadataMap,
    requests: mpsc::UnboundedReceiver<DiscoveryRequest>,
    responses: RespTx<DiscoveryResponse>,
    stash: VecDeque<DiscoveryRequest>,
    nonce: u64,
}

impl SotwStream {
    /// The next request of `ty` (requests of other types are kept for later).
    async fn expect(&mut self, ty: &str) -> DiscoveryRequest {
        next_of(&mut self.requests, &mut self.stash, ty, |r| &r.type_url).await
    }

    /// Send a response; returns its nonce.
    fn push(&mut self, ty: &str, version: &str, resources: Vec<Any>) -> String {
        self.nonce += 1;
        let nonce = format!("n{}", self.nonce);
        self.responses
            .unbounded_send(Ok(DiscoveryResponse {
                version_info: version.into(),
                resources,
                type_url: ty.into(),
                nonce: nonce.clone(),
                ..Default::default()
            }))
            .expect("client listening");
        nonce
    }

    /// Send a response and return the request answering it (ACK or NACK).
    async fn push_and_answer(
        &mut self,
        ty: &str,
        version: &str,
        resources: Vec<Any>,
    ) -> DiscoveryRequest {
        let nonce = self.push(ty, version, resources);
        loop {
            let r = self.expect(ty).await;
            if r.response_nonce == nonce {
                return r;
            }
        }
    }
}

/// One delta stream as the server sees it.
struct DeltaStream {
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: RespTx<DeltaDiscoveryResponse>,
    stash: VecDeque<DeltaDiscoveryRequest>,
    nonce: u64,
}

impl DeltaStream {
    async fn expect(&mut self, ty: &str) -> DeltaDiscoveryRequest {
        next_of(&mut self.requests, &mut self.stash, ty, |r| &r.type_url).await
    }

    async fn push_and_answer(
        &mut self,
        ty: &str,
        resources: Vec<(String, String, Any)>,
        removed: &[&str],
    ) -> DeltaDiscoveryRequest {
        self.nonce += 1;
        let nonce = format!("d{}", self.nonce);
        self.responses
            .unbounded_send(Ok(DeltaDiscoveryResponse {
                system_version_info: format!("sys{}", self.nonce),
                resources: resources
                    .into_iter()
                    .map(|(name, version, body)| DeltaResource {
                        name,
                        version,
                        resource: Some(body),
                        ..Default::default()
                    })
                    .collect(),
                type_url: ty.into(),
                removed_resources: removed.iter().map(|s| s.to_string()).collect(),
                nonce: nonce.clone(),
                ..Default::default()
            }))
            .expect("client listening");
        loop {
            let r = self.expect(ty).await;
            if r.response_nonce == nonce {
                return r;
            }
        }
    }
}

#[derive(Clone)]
struct FakeAds {
    sotw: mpsc::UnboundedSender<SotwStream>,
    delta: mpsc::UnboundedSender<DeltaStream>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let metadata = req.metadata().clone();
        let rrx = forward_requests(req.into_inner());
        let (tx, rx) = mpsc::unbounded();
        let _ = self.sotw.unbounded_send(SotwStream {
            metadata,
            requests: rrx,
            responses: tx,
            stash: VecDeque::new(),
            nonce: 0,
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let rrx = forward_requests(req.into_inner());
        let (tx, rx) = mpsc::unbounded();
        let _ = self.delta.unbounded_send(DeltaStream {
            requests: rrx,
            responses: tx,
            stash: VecDeque::new(),
            nonce: 0,
        });
        Ok(Response::new(Box::pin(rx)))
    }
}

/// A scripted ADS server on 127.0.0.1:0.
struct Server {
    addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<SotwStream>,
    delta: mpsc::UnboundedReceiver<DeltaStream>,
    stop: tokio_util::sync::CancellationToken,
}

impl Server {
    async fn start() -> Server {
        Self::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    async fn start_on(addr: SocketAddr) -> Server {
        let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (stx, srx) = mpsc::unbounded();
        let (dtx, drx) = mpsc::unbounded();
        let svc = AggregatedDiscoveryServiceServer::new(FakeAds {
            sotw: stx,
            delta: dtx,
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(l);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, s.cancelled_owned())
                .await;
        });
        Server {
            addr,
            sotw: srx,
            delta: drx,
            stop,
        }
    }

    async fn sotw_stream(&mut self) -> SotwStream {
        tokio::time::timeout(WAIT, self.sotw.next())
            .await
            .expect("proxy opened an ADS stream")
            .expect("server running")
    }

    async fn delta_stream(&mut self) -> DeltaStream {
        tokio::time::timeout(WAIT, self.delta.next())
            .await
            .expect("proxy opened a delta ADS stream")
            .expect("server running")
    }
}

fn bootstrap(ads: SocketAddr, api_type: &str, extra_static: &str) -> String {
    format!(
        r#"
node: {{id: node-1, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds}}
      initial_metadata: [{{key: authorization, value: "Bearer test-token"}}]
  cds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 10s}}
  lds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 10s}}
static_resources:
  clusters:
{xds}{extra_static}"#,
        xds = xds_cluster_yaml(ads.port())
    )
}

fn eds_cluster(name: &str) -> Any {
    let c: Cluster = weir_xds_api::from_yaml(&format!(
        "name: {name}\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}}}\n"
    ))
    .expect("cluster");
    weir_xds_api::pack(&c)
}

fn static_cluster(name: &str, port: u16) -> Any {
    let c: Cluster = weir_xds_api::from_yaml(&format!(
        "name: {name}\ntype: STATIC\nconnect_timeout: 1s\nload_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}\n"
    ))
    .expect("cluster");
    weir_xds_api::pack(&c)
}

/// A load assignment with (port, weight) endpoints.
fn cla(name: &str, eps: &[(u16, u32)]) -> Any {
    let eps: String = eps
        .iter()
        .map(|(p, w)| format!("  - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n    load_balancing_weight: {w}\n"))
        .collect();
    let c: ClusterLoadAssignment = weir_xds_api::from_yaml(&format!(
        "cluster_name: {name}\nendpoints:\n- lb_endpoints:\n{eps}"
    ))
    .expect("cla");
    weir_xds_api::pack(&c)
}

/// A listener on 127.0.0.1:0 whose connection manager takes route config `route` by RDS.
fn rds_listener(name: &str, route: &str) -> Any {
    let l: Listener = weir_xds_api::from_yaml(&format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      rds: {{route_config_name: {route}, config_source: {{ads: {{}}, resource_api_version: V3}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    ))
    .expect("listener");
    weir_xds_api::pack(&l)
}

/// A listener with an inline route config sending everything to `cluster`, tagging
/// responses with `x-route: {tag}`.
fn inline_listener(name: &str, cluster: &str, tag: &str) -> Any {
    let l: Listener = weir_xds_api::from_yaml(&format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      route_config:
        name: inline
        response_headers_to_add: [{{header: {{key: x-route, value: {tag}}}}}]
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}, timeout: 10s}}}}]
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    ))
    .expect("listener");
    weir_xds_api::pack(&l)
}

/// A route config sending everything to `cluster`, tagging responses with `x-route: {tag}`.
fn route(name: &str, cluster: &str, tag: &str) -> Any {
    let r: RouteConfiguration = weir_xds_api::from_yaml(&format!(
        r#"
name: {name}
response_headers_to_add: [{{header: {{key: x-route, value: {tag}}}}}]
virtual_hosts:
- name: all
  domains: ["*"]
  routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}, timeout: 10s}}}}]
"#
    ))
    .expect("route");
    weir_xds_api::pack(&r)
}

fn tag(h: &http::HeaderMap) -> String {
    h.get("x-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Serve the initial fetch of a SotW stream: cluster `svc` (EDS, endpoints `eps`), listener
/// `web` with RDS route `r1` (tag `v1`). Returns the stream after every ACK.
async fn initial_sotw(s: &mut SotwStream, eps: &[(u16, u32)]) {
    assert_eq!(
        s.metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer test-token"),
        "initial_metadata is sent with the stream"
    );
    let r = s.expect(CDS).await;
    assert_eq!(r.version_info, "");
    let node = r.node.as_ref().expect("first request carries the node");
    assert_eq!(
        (node.id.as_str(), node.cluster.as_str()),
        ("node-1", "test")
    );
    assert_eq!(node.user_agent_name, "weir");
    let ack = s.push_and_answer(CDS, "c1", vec![eds_cluster("svc")]).await;
    assert_eq!(ack.version_info, "c1");
    assert!(ack.error_detail.is_none());
    // The EDS cluster subscribes to its endpoints by name.
    let r = s.expect(EDS).await;
    assert_eq!(r.resource_names, ["svc"]);
    let ack = s.push_and_answer(EDS, "e1", vec![cla("svc", eps)]).await;
    assert_eq!(ack.version_info, "e1");
    let r = s.expect(LDS).await;
    assert!(
        r.resource_names.is_empty(),
        "LDS is a wildcard subscription"
    );
    let ack = s
        .push_and_answer(LDS, "l1", vec![rds_listener("web", "r1")])
        .await;
    assert_eq!(ack.version_info, "l1");
    let r = s.expect(RDS).await;
    assert_eq!(r.resource_names, ["r1"]);
    let ack = s
        .push_and_answer(RDS, "r1v1", vec![route("r1", "svc", "v1")])
        .await;
    assert_eq!(ack.version_info, "r1v1");
    assert!(ack.error_detail.is_none());
}

#[tokio::test]
async fn sotw_initial_fetch_serves_traffic_and_config_dump() {
    let b = Backend::start("b1").await;
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    initial_sotw(&mut s, &[(b.port(), 1)]).await;
    // The server starts accepting only once the initial fetch is complete.
    let p = tokio::time::timeout(WAIT, proxy)
        .await
        .expect("proxy started after the initial fetch")
        .expect("start task");
    let (st, h, body) = get(p.addr("web"), "x", "/hello").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(tag(&h), "v1");
    assert_eq!(json(&body)["backend"], "b1");

    assert_eq!(p.stat("control_plane.connected_state"), 1);
    assert_eq!(p.stat("cluster_manager.cds.update_success"), 1);
    assert_eq!(p.stat("listener_manager.lds.update_success"), 1);
    assert_eq!(p.stat("cluster_manager.cluster_added"), 1);
    assert_eq!(p.stat("cluster.svc.update_success"), 1);
    assert_eq!(p.stat("http.web.rds.r1.update_success"), 1);
    assert_eq!(p.stat("cluster_manager.active_clusters"), 2);

    let url = format!("http://{}/config_dump", p.admin());
    let dump = admin_json(&url).await;
    let configs = dump["configs"].as_array().expect("configs");
    let find = |t: &str| {
        configs
            .iter()
            .find(|c| c["@type"].as_str().is_some_and(|x| x.ends_with(t)))
            .unwrap_or_else(|| panic!("{t} in config_dump"))
            .clone()
    };
    let clusters = find("ClustersConfigDump");
    assert_eq!(clusters["version_info"], "c1");
    let dc = &clusters["dynamic_active_clusters"][0];
    assert_eq!(dc["version_info"], "c1");
    assert_eq!(dc["cluster"]["name"], "svc");
    assert!(dc["last_updated"].is_string());
    let listeners = find("ListenersConfigDump");
    assert_eq!(listeners["version_info"], "l1");
    let dl = &listeners["dynamic_listeners"][0];
    assert_eq!(dl["name"], "web");
    assert_eq!(dl["active_state"]["version_info"], "l1");
    let routes = find("RoutesConfigDump");
    assert_eq!(routes["dynamic_route_configs"][0]["version_info"], "r1v1");
    assert_eq!(
        routes["dynamic_route_configs"][0]["route_config"]["name"],
        "r1"
    );
    let eds = admin_json(&format!("{url}?include_eds")).await;
    let has_eds = eds["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .any(|c| c["dynamic_endpoint_configs"][0]["endpoint_config"]["cluster_name"] == "svc");
    assert!(has_eds, "include_eds shows the assignment: {eds}");
    p.stop().await;
    ads.stop.cancel();
}

async fn admin_json(url: &str) -> serde_json::Value {
    let uri: http::Uri = url.parse().expect("uri");
    let addr: SocketAddr = uri
        .authority()
        .expect("authority")
        .as_str()
        .parse()
        .expect("addr");
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let (st, _, body) = get(addr, "admin", path).await;
    assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    json(&body)
}

#[tokio::test]
async fn nack_names_the_resource_and_keeps_the_old_config() {
    let b = Backend::start("b1").await;
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    initial_sotw(&mut s, &[(b.port(), 1)]).await;
    let p = proxy.await.expect("start");

    // A push with one bad cluster and one good one: the good one applies, the response is
    // NACKed with the previous version and the bad cluster's field named.
    let bad: Cluster = weir_xds_api::from_yaml(
        "name: broken\ntype: STATIC\nconnect_timeout: -1s\nlb_policy: CLUSTER_PROVIDED\n",
    )
    .expect("cluster");
    let b2 = Backend::start("b2").await;
    let nack = s
        .push_and_answer(
            CDS,
            "c2",
            vec![
                eds_cluster("svc"),
                weir_xds_api::pack(&bad),
                static_cluster("other", b2.port()),
            ],
        )
        .await;
    assert_eq!(
        nack.version_info, "c1",
        "a NACK carries the last accepted version"
    );
    let detail = nack.error_detail.expect("error_detail");
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("Cluster \"broken\""),
        "{}",
        detail.message
    );
    assert!(detail.message.contains("lb_policy"), "{}", detail.message);
    assert!(!detail.message.contains("\"other\""), "{}", detail.message);
    assert_eq!(p.stat("cluster_manager.cds.update_rejected"), 1);
    // Traffic keeps flowing on the old config; the good new cluster is active.
    let (st, _, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&body)["backend"], "b1");
    assert!(p.handle.state.clusters.get("other").is_some());
    assert!(p.handle.state.clusters.get("broken").is_none());

    // A bad route config is NACKed; the routes in use stay.
    let bad_route: RouteConfiguration = weir_xds_api::from_yaml(
        "name: r1\nvirtual_hosts: [{name: a, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: svc, timeout: -2s}}]}]\n",
    )
    .expect("route");
    let nack = s
        .push_and_answer(RDS, "r1v2", vec![weir_xds_api::pack(&bad_route)])
        .await;
    assert_eq!(nack.version_info, "r1v1");
    let msg = nack.error_detail.expect("nack").message;
    assert!(msg.contains("RouteConfiguration \"r1\""), "{msg}");
    assert!(
        msg.contains("virtual_hosts[0].routes[0].route.timeout"),
        "{msg}"
    );
    let (st, h, _) = get(p.addr("web"), "x", "/").await;
    assert_eq!((st, tag(&h).as_str()), (StatusCode::OK, "v1"));
    assert_eq!(p.stat("http.web.rds.r1.update_rejected"), 1);

    // The next good push is ACKed with its version.
    let ack = s
        .push_and_answer(RDS, "r1v3", vec![route("r1", "other", "v3")])
        .await;
    assert_eq!(ack.version_info, "r1v3");
    assert!(ack.error_detail.is_none());
    let (_, h, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(tag(&h), "v3");
    assert_eq!(json(&body)["backend"], "b2");
    p.stop().await;
    ads.stop.cancel();
}

#[tokio::test]
async fn weight_changes_apply_in_place_under_load() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    initial_sotw(&mut s, &[(b1.port(), 1)]).await;
    let p = proxy.await.expect("start");
    let addr = p.addr("web");

    // Two clients loop over kept-alive connections while endpoints and weights change.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut loops = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let mut sender = h1_client(addr).await;
            let (mut ok, mut failed) = (0u32, 0u32);
            for _ in 0..3000 {
                if stop.is_cancelled() {
                    break;
                }
                let req = http::Request::get("/")
                    .header("host", "x")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("req");
                match sender.send_request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                        ok += 1;
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ack = s
        .push_and_answer(
            EDS,
            "e2",
            vec![cla("svc", &[(b1.port(), 1), (b2.port(), 1)])],
        )
        .await;
    assert!(ack.error_detail.is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ack = s
        .push_and_answer(
            EDS,
            "e3",
            vec![cla("svc", &[(b1.port(), 1), (b2.port(), 9)])],
        )
        .await;
    assert!(ack.error_detail.is_none());
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    for l in loops {
        let (ok, failed) = l.await.expect("loop");
        assert_eq!(
            failed, 0,
            "no request failed across endpoint updates ({ok} ok)"
        );
        assert!(ok > 0);
    }
    // The new weights decide: 9 of every 10 picks go to b2.
    let (h1, h2) = (b1.hits(), b2.hits());
    for _ in 0..100 {
        let (st, _, _) = get(addr, "x", "/").await;
        assert_eq!(st, StatusCode::OK);
    }
    let (d1, d2) = (b1.hits() - h1, b2.hits() - h2);
    assert_eq!(d1 + d2, 100);
    // Smooth weighted round robin is exact per worker over each cycle of 10 picks; with two
    // workers each may be part-way through a cycle.
    assert!(
        (8..=12).contains(&d1),
        "about 1 in 10 picks to the weight-1 host: ({d1}, {d2})"
    );
    assert!(p.stat("cluster_manager.cluster_updated") >= 2);
    assert_eq!(
        p.stat("cluster_manager.cluster_modified"),
        0,
        "EDS never rebuilds the cluster"
    );
    p.stop().await;
    ads.stop.cancel();
}

async fn h1_client(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn listener_change_drains_the_old_version_and_routes_change_in_place() {
    let b1 = Backend::start("b1").await;
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    initial_sotw(&mut s, &[(b1.port(), 1)]).await;
    let p = proxy.await.expect("start");
    let web = p.addr("web");

    // A connection opened before a route change sees the new routes on its next request.
    let mut c = h1_client(web).await;
    let req = || {
        http::Request::get("/")
            .header("host", "x")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req")
    };
    let r = c.send_request(req()).await.expect("first");
    assert_eq!(tag(r.headers()), "v1");
    let _ = http_body_util::BodyExt::collect(r.into_body()).await;
    s.push_and_answer(RDS, "r1v2", vec![route("r1", "svc", "v2")])
        .await;
    let r = c.send_request(req()).await.expect("second");
    assert_eq!(tag(r.headers()), "v2", "same connection, new routes");
    let _ = http_body_util::BodyExt::collect(r.into_body()).await;
    // An idle keep-alive connection would keep the drained version (and its RDS slot) in use
    // for the HCM's drain_timeout; this test is about what happens once nothing uses it.
    drop(c);

    // Start a slow request, then replace the listener with one using an inline route.
    let slow = tokio::spawn(async move {
        let (st, h, body) = get(web, "x", "/slow/700").await;
        (st, tag(&h), body)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let ack = s
        .push_and_answer(LDS, "l2", vec![inline_listener("web", "svc", "inline")])
        .await;
    assert_eq!(ack.version_info, "l2");
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let (st, t, body) = slow.await.expect("slow");
    assert_eq!(
        st,
        StatusCode::OK,
        "the in-flight request finished on the old listener"
    );
    assert_eq!(t, "v2");
    assert_eq!(json(&body)["backend"], "b1");
    let (st, h, _) = get(p.addr("web"), "x", "/").await;
    assert_eq!((st, tag(&h).as_str()), (StatusCode::OK, "inline"));
    assert_eq!(p.stat("listener_manager.listener_modified"), 1);

    // Removing it from the state of the world removes the listener.
    let ack = s.push_and_answer(LDS, "l3", vec![]).await;
    assert_eq!(ack.version_info, "l3");
    eventually("listener removed", || {
        p.handle.listener_addr("web").is_none()
    })
    .await;
    assert_eq!(p.stat("listener_manager.listener_removed"), 1);
    // ... and the route config nobody uses any more is unsubscribed.
    let mut unsubscribed = false;
    for _ in 0..5 {
        let r = s.expect(RDS).await;
        if r.resource_names.is_empty() {
            unsubscribed = true;
            break;
        }
    }
    assert!(unsubscribed, "RDS names dropped once no listener uses r1");
    p.stop().await;
    ads.stop.cancel();
}

#[tokio::test]
async fn server_restart_resyncs_and_the_last_config_keeps_serving() {
    let b1 = Backend::start("b1").await;
    let mut ads = Server::start().await;
    let ads_addr = ads.addr;
    let yaml = bootstrap(ads_addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    initial_sotw(&mut s, &[(b1.port(), 1)]).await;
    let p = proxy.await.expect("start");

    // The control plane goes away.
    ads.stop.cancel();
    drop(s);
    drop(ads);
    eventually("disconnected", || {
        p.stat("control_plane.connected_state") == 0
    })
    .await;
    let (st, _, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::OK, "last good config serves");
    assert_eq!(json(&body)["backend"], "b1");

    // It comes back on the same address: the proxy reconnects and re-subscribes with what
    // it holds, so the server knows its versions.
    let mut ads = Server::start_on(ads_addr).await;
    let mut s = ads.sotw_stream().await;
    let r = s.expect(CDS).await;
    assert_eq!(r.version_info, "c1");
    assert!(r.node.is_some());
    let r = s.expect(EDS).await;
    assert_eq!(
        (r.version_info.as_str(), r.resource_names.as_slice()),
        ("e1", &["svc".to_string()][..])
    );
    let r = s.expect(LDS).await;
    assert_eq!(r.version_info, "l1");
    let r = s.expect(RDS).await;
    assert_eq!(r.version_info, "r1v1");
    eventually("reconnected", || {
        p.stat("control_plane.connected_state") == 1
    })
    .await;
    // The new server's state applies.
    let b2 = Backend::start("b2").await;
    s.push_and_answer(EDS, "e9", vec![cla("svc", &[(b2.port(), 1)])])
        .await;
    let (_, _, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(json(&body)["backend"], "b2");
    assert!(p.stat("cluster_manager.cds.update_failure") >= 1);
    p.stop().await;
    ads.stop.cancel();
}

#[tokio::test]
async fn delta_adds_and_removes_resources() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "DELTA_GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.delta_stream().await;
    let r = s.expect(CDS).await;
    assert_eq!(r.resource_names_subscribe, ["*"]);
    assert!(r.node.is_some());
    let ack = s
        .push_and_answer(
            CDS,
            vec![
                ("svc".into(), "1".into(), eds_cluster("svc")),
                ("two".into(), "1".into(), static_cluster("two", b2.port())),
            ],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none());
    let r = s.expect(EDS).await;
    assert_eq!(r.resource_names_subscribe, ["svc"]);
    s.push_and_answer(
        EDS,
        vec![("svc".into(), "1".into(), cla("svc", &[(b1.port(), 1)]))],
        &[],
    )
    .await;
    let r = s.expect(LDS).await;
    assert_eq!(r.resource_names_subscribe, ["*"]);
    s.push_and_answer(
        LDS,
        vec![
            ("web".into(), "1".into(), rds_listener("web", "r1")),
            (
                "two".into(),
                "1".into(),
                inline_listener("two", "two", "two"),
            ),
        ],
        &[],
    )
    .await;
    let r = s.expect(RDS).await;
    assert_eq!(r.resource_names_subscribe, ["r1"]);
    s.push_and_answer(
        RDS,
        vec![("r1".into(), "1".into(), route("r1", "svc", "v1"))],
        &[],
    )
    .await;
    let p = proxy.await.expect("start");
    let (_, h, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(
        (tag(&h).as_str(), json(&body)["backend"].as_str()),
        ("v1", Some("b1"))
    );
    let (_, h, body) = get(p.addr("two"), "x", "/").await;
    assert_eq!(
        (tag(&h).as_str(), json(&body)["backend"].as_str()),
        ("two", Some("b2"))
    );

    // Remove listener `two` and cluster `two`; an unknown name in removed is harmless.
    let ack = s.push_and_answer(LDS, vec![], &["two", "nope"]).await;
    assert!(ack.error_detail.is_none());
    eventually("listener two removed", || {
        p.handle.listener_addr("two").is_none()
    })
    .await;
    let ack = s.push_and_answer(CDS, vec![], &["two"]).await;
    assert!(ack.error_detail.is_none());
    assert!(p.handle.state.clusters.get("two").is_none());
    assert_eq!(p.stat("cluster_manager.cluster_removed"), 1);
    // Web still serves.
    let (st, _, _) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::OK);

    // A bad resource is NACKed with its name; the error is per resource.
    let bad: Listener = weir_xds_api::from_yaml("name: bad\naddress: {socket_address: {address: 127.0.0.1, port_value: 0}}\nfilter_chains: []\ntransparent: true\n").expect("listener");
    let nack = s
        .push_and_answer(
            LDS,
            vec![("bad".into(), "1".into(), weir_xds_api::pack(&bad))],
            &[],
        )
        .await;
    let msg = nack.error_detail.expect("nack").message;
    assert!(msg.contains("Listener \"bad\""), "{msg}");
    assert!(msg.contains("transparent"), "{msg}");
    p.stop().await;
    ads.stop.cancel();
}

#[tokio::test]
async fn cluster_warming_is_bounded_by_initial_fetch_timeout() {
    let mut ads = Server::start().await;
    let yaml = bootstrap(ads.addr, "GRPC", "");
    let proxy = tokio::spawn(async move { Proxy::start(&yaml).await });
    let mut s = ads.sotw_stream().await;
    s.expect(CDS).await;
    let c: Cluster = weir_xds_api::from_yaml(
        "name: slow\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {eds_config: {ads: {}, initial_fetch_timeout: 0.3s}}\n",
    )
    .expect("cluster");
    s.push_and_answer(CDS, "c1", vec![weir_xds_api::pack(&c)])
        .await;
    let r = s.expect(EDS).await;
    assert_eq!(r.resource_names, ["slow"]);
    s.expect(LDS).await;
    s.push_and_answer(LDS, "l1", vec![inline_listener("web", "slow", "t")])
        .await;
    // No assignment is ever sent: the cluster activates empty after its timeout and the
    // server starts.
    let p = tokio::time::timeout(WAIT, proxy)
        .await
        .expect("started")
        .expect("task");
    assert!(p.handle.state.clusters.get("slow").is_some());
    let (st, h, _) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{h:?}");
    assert_eq!(p.stat("cluster.slow.init_fetch_timeout"), 1);
    assert!(p.stat("cluster.slow.upstream_cx_none_healthy") >= 1);
    p.stop().await;
    ads.stop.cancel();
}

#[tokio::test]
async fn filesystem_xds_reloads_on_change() {
    let b1 = Backend::start("b1").await;
    let b2 = Backend::start("b2").await;
    let dir = std::env::temp_dir().join(format!("weir-fsxds-{}-{}", std::process::id(), b1.port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |name: &str, text: &str| {
        // Atomic swap, as operators (and Kubernetes ConfigMaps) do it.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    };
    let cds = |port: u16, version: &str| {
        format!(
            "version_info: \"{version}\"\nresources:\n- \"@type\": {CDS}\n  name: svc\n  type: STATIC\n  connect_timeout: 1s\n  load_assignment: {{cluster_name: svc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}\n"
        )
    };
    write("cds.yaml", &cds(b1.port(), "1"));
    write(
        "lds.yaml",
        &format!(
            r#"version_info: "1"
resources:
- "@type": {LDS}
  name: web
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: web
        rds: {{route_config_name: r1, config_source: {{path_config_source: {{path: {rds}, watched_directory: {{path: {dir}}}}}}}}}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
            rds = dir.join("rds.yaml").display(),
            dir = dir.display()
        ),
    );
    let rds = |t: &str| {
        format!(
            "version_info: {t}\nresources:\n- \"@type\": {RDS}\n  name: r1\n  response_headers_to_add: [{{header: {{key: x-route, value: {t}}}}}]\n  virtual_hosts: [{{name: a, domains: ['*'], routes: [{{match: {{prefix: /}}, route: {{cluster: svc}}}}]}}]\n"
        )
    };
    write("rds.yaml", &rds("f1"));
    let yaml = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}\ndynamic_resources:\n  cds_config: {{path_config_source: {{path: {c}, watched_directory: {{path: {d}}}}}}}\n  lds_config: {{path_config_source: {{path: {l}, watched_directory: {{path: {d}}}}}}}\n",
        c = dir.join("cds.yaml").display(),
        l = dir.join("lds.yaml").display(),
        d = dir.display()
    );
    let p = tokio::time::timeout(WAIT, Proxy::start(&yaml))
        .await
        .expect("starts from files");
    let (st, h, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(tag(&h), "f1");
    assert_eq!(json(&body)["backend"], "b1");

    // Route and cluster changes are picked up.
    write("rds.yaml", &rds("f2"));
    write("cds.yaml", &cds(b2.port(), "2"));
    let mut seen = false;
    for _ in 0..200 {
        let (_, h, body) = get(p.addr("web"), "x", "/").await;
        if tag(&h) == "f2" && json(&body)["backend"] == "b2" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "file changes applied");
    assert_eq!(p.stat("cluster_manager.cluster_modified"), 1);

    // A broken file keeps the last good config.
    write(
        "cds.yaml",
        "version_info: 3\nresources: [{\"@type\": nope}]\n",
    );
    eventually("bad file counted", || {
        p.stat("cluster_manager.cds.update_failure") >= 1
    })
    .await;
    let (st, _, body) = get(p.addr("web"), "x", "/").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(json(&body)["backend"], "b2");
    p.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
