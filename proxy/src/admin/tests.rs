//! Admin endpoints over a real socket, with a real hyper client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::cli::Options;
use crate::server::ServerState;
use crate::stats::Store;
use crate::upstream::ClusterManager;

const BOOTSTRAP: &str = r#"
node: {id: node-1, cluster: mesh}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  clusters:
  - name: backend
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          route_config:
            name: local_route
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: backend}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;

/// A `ServerState` for `BOOTSTRAP`, as `server::start` builds it (without binding listeners:
/// the listener table is filled with a fixed address).
fn for_tests() -> Arc<ServerState> {
    let stats = Store::new();
    let bootstrap = crate::config::parse_bootstrap(BOOTSTRAP).expect("bootstrap parses");
    let snapshot = crate::config::translate(bootstrap, &stats).expect("bootstrap translates");
    let clusters = ClusterManager::new(&snapshot.clusters, &stats);
    let options = Options {
        service_node: Some("node-1".into()),
        concurrency: Some(2),
        drain_time_s: 5,
        ..Options::default()
    };
    let state = ServerState::new(options, snapshot, clusters, 2);
    state.server_stats.state.set(2.0);
    state
}

/// An admin server on 127.0.0.1:0 and a client for it.
struct TestAdmin {
    state: Arc<ServerState>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        assert_eq!(self.content_type(), "application/json", "{}", self.body);
        serde_json::from_str(&self.body).expect("valid JSON")
    }
}

impl TestAdmin {
    async fn start() -> Self {
        Self::start_with(for_tests()).await
    }

    async fn start_with(state: Arc<ServerState>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(super::serve(l, state.clone()));
        Self { state, addr, task }
    }

    /// Mark the server as started, as `server::start` does once listeners accept.
    fn go_live(&self) {
        let ingress = self.state.snapshot.load().listeners[0].clone();
        self.state
            .listener_manager
            .record_for_tests(ingress, "127.0.0.1:10000".parse().expect("addr"));
        self.state.ready.store(true, Ordering::SeqCst);
    }

    async fn call(&self, method: Method, path: &str) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "admin")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).expect("utf-8"),
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path).await
    }

    async fn post(&self, path: &str) -> Reply {
        self.call(Method::POST, path).await
    }
}

#[tokio::test]
async fn ready_follows_server_state() {
    let a = TestAdmin::start().await;
    let r = a.get("/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "PRE_INITIALIZING\n");
    assert!(r.content_type().starts_with("text/plain"));

    a.go_live();
    let r = a.get("/ready").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "LIVE\n"));

    // Failing health checks makes the server DRAINING, as in Envoy.
    let r = a.post("/healthcheck/fail").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "OK\n"));
    assert!(!a.state.healthy.load(Ordering::SeqCst));
    let r = a.get("/ready").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    );
    let r = a.post("/healthcheck/ok").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(a.state.healthy.load(Ordering::SeqCst));
    assert_eq!(a.get("/ready").await.body, "LIVE\n");

    let r = a.post("/drain_listeners?graceful").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "OK\n"));
    assert!(a.state.draining.is_cancelled());
    assert!(!a.state.shutdown.is_cancelled());
    let r = a.get("/ready").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
    );
}

#[tokio::test]
async fn mutations_require_post() {
    let a = TestAdmin::start().await;
    a.go_live();
    for path in [
        "/healthcheck/fail",
        "/healthcheck/ok",
        "/drain_listeners",
        "/quitquitquit",
    ] {
        let r = a.get(path).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert!(r.body.contains("POST required"), "{path}: {}", r.body);
        assert_eq!(r.headers.get(http::header::ALLOW).expect("allow"), "POST");
    }
    assert!(a.state.healthy.load(Ordering::SeqCst));
    assert!(!a.state.draining.is_cancelled());
    assert!(!a.state.shutdown.is_cancelled());
    let r = a.call(Method::DELETE, "/stats").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn index_and_not_found() {
    let a = TestAdmin::start().await;
    let r = a.get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    for p in [
        "/clusters",
        "/config_dump",
        "/listeners",
        "/ready",
        "/server_info",
        "/stats/prometheus",
        "/quitquitquit",
    ] {
        assert!(
            r.body.contains(&format!("  {p}")),
            "{p} missing: {}",
            r.body
        );
    }
    let r = a.get("/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.contains("/config_dump"), "{}", r.body);
}

#[tokio::test]
async fn stats_text_json_filter_and_prometheus() {
    let a = TestAdmin::start().await;
    a.go_live();
    a.state.server_stats.live.set(1.0);
    a.state
        .stats
        .cluster("backend")
        .counter("upstream_rq_total")
        .increment(3);

    let r = a.get("/stats").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type().starts_with("text/plain"));
    let lines: Vec<&str> = r.body.lines().collect();
    assert!(lines.contains(&"server.live: 1"), "{}", r.body);
    assert!(
        lines.contains(&"cluster.backend.upstream_rq_total: 3"),
        "{}",
        r.body
    );
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "sorted by name");

    let r = a.get("/stats?filter=%5Eserver%5C.&usedonly").await;
    assert!(!r.body.is_empty());
    assert!(
        r.body.lines().all(|l| l.starts_with("server.")),
        "{}",
        r.body
    );

    let v = a
        .get("/stats?format=json&filter=upstream_rq_total")
        .await
        .json();
    assert_eq!(
        v,
        serde_json::json!({"stats": [{"name": "cluster.backend.upstream_rq_total", "value": 3}]})
    );

    let r = a.get("/stats?filter=(").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let r = a.get("/stats/prometheus").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "text/plain; version=0.0.4");
    assert!(
        r.body
            .contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend\"} 3"),
        "{}",
        r.body
    );
    assert!(r.body.contains("envoy_server_live 1"), "{}", r.body);
}

#[tokio::test]
async fn config_dump_has_envoys_shape() {
    let a = TestAdmin::start().await;
    let r = a.get("/config_dump?include_eds").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    let configs = v["configs"].as_array().expect("configs");
    let types: Vec<&str> = configs
        .iter()
        .map(|c| c["@type"].as_str().expect("@type"))
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        ]
    );
    let boot = &configs[0];
    assert_eq!(boot["bootstrap"]["node"]["id"], "node-1");
    assert!(boot["last_updated"].is_string());

    let c = &configs[1]["static_clusters"][0];
    assert_eq!(
        c["cluster"]["@type"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(c["cluster"]["name"], "backend");
    assert_eq!(c["cluster"]["connect_timeout"], "1s");
    assert!(c["last_updated"].is_string());

    let l = &configs[2]["static_listeners"][0];
    assert_eq!(
        l["listener"]["@type"],
        "type.googleapis.com/envoy.config.listener.v3.Listener"
    );
    assert_eq!(l["listener"]["name"], "ingress");
    assert_eq!(
        l["listener"]["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"],
        "ingress_http"
    );

    let rc = &configs[3]["static_route_configs"][0];
    assert_eq!(
        rc["route_config"]["@type"],
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    );
    assert_eq!(rc["route_config"]["name"], "local_route");
    assert_eq!(
        rc["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"],
        "backend"
    );

    // ?resource= returns the elements, tagged with their nested type.
    let v = a.get("/config_dump?resource=static_clusters").await.json();
    let items = v["configs"].as_array().expect("configs");
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.StaticCluster"
    );
    assert_eq!(items[0]["cluster"]["name"], "backend");
    let v = a
        .get("/config_dump?resource=dynamic_listeners")
        .await
        .json();
    assert_eq!(v, serde_json::json!({"configs": []}));
    let r = a.get("/config_dump?resource=bogus").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // ?mask= keeps the named paths (and @type).
    let v = a
        .get("/config_dump?resource=static_clusters&mask=cluster.name")
        .await
        .json();
    assert_eq!(
        v["configs"][0],
        serde_json::json!({
            "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.StaticCluster",
            "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "backend"}
        })
    );
    let v = a.get("/config_dump?mask=bootstrap.node.id").await.json();
    assert_eq!(v["configs"][0]["bootstrap"]["node"]["id"], "node-1");
    assert!(v["configs"][0]["bootstrap"].get("admin").is_none());
}

#[tokio::test]
async fn clusters_and_listeners() {
    let a = TestAdmin::start().await;
    a.go_live();
    let r = a.get("/clusters").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.content_type().starts_with("text/plain"));
    // Every line is `cluster::...`; host lines are unit-tested in `clusters`.
    for line in r.body.lines() {
        assert!(line.split("::").count() >= 3, "{line}");
    }
    let v = a.get("/clusters?format=json").await.json();
    let statuses = v["cluster_statuses"].as_array().expect("cluster_statuses");
    for c in statuses {
        assert!(c["name"].is_string());
    }

    let r = a.get("/listeners").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "ingress::127.0.0.1:10000\n");
    let v = a.get("/listeners?format=json").await.json();
    assert_eq!(
        v,
        serde_json::json!({"listener_statuses": [{
            "name": "ingress",
            "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}
        }]})
    );
}

#[tokio::test]
async fn server_info_like_envoys() {
    let a = TestAdmin::start().await;
    let v = a.get("/server_info").await.json();
    assert_eq!(v["state"], "PRE_INITIALIZING");
    a.go_live();
    let v = a.get("/server_info").await.json();
    assert_eq!(
        v["version"],
        format!("weir/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    assert_eq!(v["state"], "LIVE");
    assert_eq!(v["hot_restart_version"], "disabled");
    assert!(
        v["uptime_current_epoch"]
            .as_str()
            .expect("uptime")
            .ends_with('s')
    );
    assert!(v["uptime_all_epochs"].is_string());
    let o = &v["command_line_options"];
    assert_eq!(o["concurrency"], 2);
    assert_eq!(o["log_level"], "info");
    assert_eq!(o["drain_time"], "5s");
    assert_eq!(o["service_node"], "node-1");
    assert_eq!(o["service_cluster"], "");
    assert_eq!(o["config_path"], "");
    assert_eq!(o["mode"], "Serve");
    assert_eq!(v["node"]["id"], "node-1");
    assert_eq!(v["node"]["cluster"], "mesh");
}

#[tokio::test]
async fn quitquitquit_answers_then_shuts_down() {
    let a = TestAdmin::start().await;
    a.go_live();
    let r = a.post("/quitquitquit").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "OK\n"));
    assert!(a.state.shutdown.is_cancelled());
    assert!(a.state.draining.is_cancelled());
    // Admin keeps answering during the drain...
    assert_eq!(a.get("/ready").await.body, "DRAINING\n");
    // ...and stops once the drain is over.
    a.state.hard_stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), a.task)
        .await
        .expect("admin stops on hard_stop")
        .expect("admin task");
}

#[tokio::test]
async fn hard_stop_lets_inflight_keepalive_connection_close() {
    let state = for_tests();
    let a = TestAdmin::start_with(state.clone()).await;
    // An idle keep-alive connection must not hold the server open.
    let _idle = tokio::net::TcpStream::connect(a.addr)
        .await
        .expect("connect");
    tokio::task::yield_now().await;
    state.hard_stop.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), a.task)
        .await
        .expect("admin stops")
        .expect("admin task");
}
