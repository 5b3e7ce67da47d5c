//! weir-cp driving a real weir (both in-process) over ADS, state of the world and delta:
//! config applied to weir-cp reaches traffic, changes apply without failed requests, the
//! proxy's ACKs show in weir-cp's status, and a weir-cp restart resyncs the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use weir_control_plane::ControlPlane;

use crate::harness::{Server, WAIT, proxy_stat, weir_cp_cluster};

/// An HTTP/1.1 backend answering `200 <name>`.
async fn backend(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// The mesh document: listener `ingress` (port 0) -> RDS `routes` -> EDS cluster `demo`
/// with `(port, weight)` endpoints; responses tagged `x-route: {tag}`.
fn mesh_doc(eps: &[(u16, u32)], tag: &str) -> String {
    let eps: String = eps
        .iter()
        .map(|(p, w)| format!("    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n      load_balancing_weight: {w}\n"))
        .collect();
    format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: demo
  type: EDS
  connect_timeout: 1s
  eds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}}}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: demo
  endpoints:
  - lb_endpoints:
{eps}- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: ingress
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        rds: {{route_config_name: routes, config_source: {{ads: {{}}, resource_api_version: V3}}}}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: routes
  response_headers_to_add: [{{header: {{key: x-route, value: {tag}}}}}]
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes: [{{match: {{prefix: /}}, route: {{cluster: demo, timeout: 5s}}}}]
"#
    )
}

fn bootstrap(xds: SocketAddr, api_type: &str) -> String {
    format!(
        r#"
node: {{id: mesh-proxy, cluster: mesh}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: weir-cp}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
"#
    ) + &weir_cp_cluster(xds)
}

async fn start_proxy(yaml: &str) -> weir_proxy::server::ServerHandle {
    let opts = weir_proxy::cli::Options {
        config_yaml: Some(yaml.to_string()),
        concurrency: Some(1),
        drain_time_s: 2,
        ..Default::default()
    };
    let snap = weir_proxy::config::load(&opts).expect("valid bootstrap");
    tokio::time::timeout(WAIT, weir_proxy::server::start(opts, snap))
        .await
        .expect("proxy finished its initial fetch")
        .expect("proxy starts")
}

/// GET / through the proxy: (status, body, x-route).
async fn get(addr: SocketAddr) -> (u16, String, String) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "mesh")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tx.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let tag = resp
        .headers()
        .get("x-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), tag)
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn mesh(api_type: &str) {
    let a = backend("a").await;
    let b = backend("b").await;
    let cp = Server::start().await;
    cp.apply(&mesh_doc(&[(a.port(), 1)], "v1"));
    let proxy = start_proxy(&bootstrap(cp.xds, api_type)).await;
    let ingress = proxy.listener_addr("ingress").expect("ingress from LDS");
    assert_eq!(get(ingress).await, (200, "a".into(), "v1".into()));

    // The proxy's ACKs are visible in weir-cp's status.
    let acked = |ty: &str| {
        cp.cp.status.report().proxies.iter().any(|p| {
            p.node_id == "mesh-proxy"
                && p.types
                    .get(ty)
                    .and_then(|t| t.acked_version.as_ref())
                    .is_some()
        })
    };
    until("every type ACKed in weir-cp's status", async || {
        ["cds", "eds", "lds", "rds"].iter().all(|t| acked(t))
    })
    .await;

    // A new weight and route tag apply; a steady client sees no failure meanwhile.
    let load = tokio::spawn(async move {
        let mut failed = 0;
        for _ in 0..150 {
            if get(ingress).await.0 != 200 {
                failed += 1;
            }
        }
        failed
    });
    cp.apply(&mesh_doc(&[(a.port(), 1), (b.port(), 3)], "v2"));
    until("v2 routes and endpoints", async || {
        let (_, body, tag) = get(ingress).await;
        tag == "v2" && body == "b"
    })
    .await;
    assert_eq!(
        load.await.expect("load"),
        0,
        "no request failed across the change"
    );
    let mut bs = 0;
    for _ in 0..40 {
        if get(ingress).await.1 == "b" {
            bs += 1;
        }
    }
    assert_eq!(bs, 30, "weights 1:3 over 40 smooth round-robin picks");
    assert_eq!(proxy_stat(&proxy, "control_plane.connected_state"), 1);
    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn weir_cp_drives_weir_sotw() {
    mesh("GRPC").await;
}

#[tokio::test]
async fn weir_cp_drives_weir_delta() {
    mesh("DELTA_GRPC").await;
}

#[tokio::test]
async fn weir_cp_restart_resyncs_the_proxy() {
    let a = backend("a").await;
    let b = backend("b").await;
    let dir = std::env::temp_dir().join(format!(
        "weir-mesh-restart-{}-{}",
        std::process::id(),
        a.port()
    ));
    let store = || Arc::new(weir_control_plane::storage::Store::open(&dir).expect("store"));
    let cp = Server::start_with(ControlPlane::with_sources(store(), Vec::new()).expect("cp")).await;
    let xds = cp.xds;
    cp.apply(&mesh_doc(&[(a.port(), 1)], "v1"));
    let proxy = start_proxy(&bootstrap(xds, "GRPC")).await;
    let ingress = proxy.listener_addr("ingress").expect("ingress");
    assert_eq!(get(ingress).await.1, "a");

    cp.stop().await;
    until("proxy notices", async || {
        proxy_stat(&proxy, "control_plane.connected_state") == 0
    })
    .await;
    assert_eq!(
        get(ingress).await,
        (200, "a".into(), "v1".into()),
        "last good config serves"
    );

    // weir-cp comes back on the same address with its stored config, then changes it.
    let cp = ControlPlane::with_sources(store(), Vec::new()).expect("reopen");
    let l = tokio::net::TcpListener::bind(xds)
        .await
        .expect("rebind xds");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(weir_control_plane::run(
        cp.clone(),
        l,
        weir_control_plane::RunOptions::default(),
        async {
            let _ = stopped.await;
        },
    ));
    until("reconnected", async || {
        proxy_stat(&proxy, "control_plane.connected_state") == 1
    })
    .await;
    cp.apply_text(
        weir_control_plane::operator::Target::All,
        &mesh_doc(&[(b.port(), 1)], "v3"),
        "test",
    )
    .expect("apply");
    until("resynced to v3", async || {
        get(ingress).await == (200, "b".into(), "v3".into())
    })
    .await;
    proxy.stop().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn quickstart_documents_apply() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let cp = Server::start().await;
    for f in ["xds.yaml", "xds-weights.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).expect("example");
        let v = cp.apply(&text);
        assert_eq!(v.resources.len(), 4, "{f}");
    }
    cp.stop().await;
}

/// A listener and route (operator config) sending everything to the registry-generated
/// cluster `svc`.
const REGISTRY_ROUTES: &str = r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: ingress
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        route_config:
          name: local
          validate_clusters: false
          virtual_hosts:
          - name: all
            domains: ["*"]
            routes: [{match: {prefix: /}, route: {cluster: svc, timeout: 5s}}]
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;

#[tokio::test]
async fn registry_instances_become_weir_endpoints() {
    use weir_control_plane::proto::registry::registry_client::RegistryClient;
    use weir_control_plane::proto::registry::{DeregisterRequest, Instance, RegisterRequest};

    let a = backend("a").await;
    let b = backend("b").await;
    let cp = Server::start().await;
    cp.apply(REGISTRY_ROUTES);
    let mut reg = RegistryClient::connect(format!("http://{}", cp.xds))
        .await
        .expect("registry client");
    let register = |id: &str, port: u16| RegisterRequest {
        instance: Some(Instance {
            service: "svc".into(),
            instance_id: id.into(),
            address: "127.0.0.1".into(),
            port: port.into(),
            weight: 1,
            ..Default::default()
        }),
    };
    reg.register(register("a-1", a.port()))
        .await
        .expect("register a");
    let proxy = start_proxy(&bootstrap(cp.xds, "DELTA_GRPC")).await;
    let ingress = proxy.listener_addr("ingress").expect("ingress");
    assert_eq!(get(ingress).await.1, "a", "the registered instance serves");

    // A second instance joins: both serve.
    reg.register(register("b-1", b.port()))
        .await
        .expect("register b");
    until("b receives traffic", async || get(ingress).await.1 == "b").await;
    // The first leaves: only b serves, with no failed request on the way.
    reg.deregister(DeregisterRequest {
        service: "svc".into(),
        instance_id: "a-1".into(),
    })
    .await
    .expect("deregister");
    until("a no longer picked", async || {
        let mut all_b = true;
        for _ in 0..4 {
            let (st, body, _) = get(ingress).await;
            assert_eq!(st, 200);
            all_b &= body == "b";
        }
        all_b
    })
    .await;
    assert!(proxy_stat(&proxy, "cluster_manager.cluster_updated") >= 2);
    proxy.stop().await;
    cp.stop().await;
}

#[tokio::test]
async fn weir_authenticates_to_weir_cp_with_a_token() {
    const TOKEN: &str = "mesh-proxy-token-0123456789";
    let a = backend("a").await;
    let settings = weir_control_plane::settings::Settings::parse(
        &format!("auth:\n  tokens:\n  - {{name: proxies, token: {TOKEN}, scopes: ['xds:read']}}\n"),
        "test",
    )
    .expect("settings");
    let cp = ControlPlane::open(None).expect("cp");
    cp.apply_text(
        weir_control_plane::operator::Target::All,
        &mesh_doc(&[(a.port(), 1)], "v1"),
        "test",
    )
    .expect("apply");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let xds = l.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(weir_control_plane::run(
        cp.clone(),
        l,
        weir_control_plane::RunOptions {
            settings,
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));

    // Without the token weir is refused: it never connects and keeps retrying (the initial
    // fetch gives up after its timeout, so the server still starts, with nothing dynamic).
    let yaml = bootstrap(xds, "GRPC");
    let no_token = yaml
        .replace(
            "cds_config: {ads: {}, resource_api_version: V3}",
            "cds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 0.5s}",
        )
        .replace(
            "lds_config: {ads: {}, resource_api_version: V3}",
            "lds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 0.5s}",
        );
    let refused = start_proxy(&no_token).await;
    assert!(refused.listener_addr("ingress").is_none());
    assert_eq!(proxy_stat(&refused, "control_plane.connected_state"), 0);
    assert_eq!(
        proxy_stat(&refused, "cluster_manager.cds.init_fetch_timeout"),
        1
    );
    until("stream failures counted", async || {
        proxy_stat(&refused, "cluster_manager.cds.update_failure") >= 1
    })
    .await;
    refused.stop().await;

    // With it (Envoy's `initial_metadata`), the mesh comes up.
    let with_token = yaml.replace(
        "grpc_services: [{envoy_grpc: {cluster_name: weir-cp}}]",
        &format!(
            "grpc_services: [{{envoy_grpc: {{cluster_name: weir-cp}}, initial_metadata: [{{key: authorization, value: 'Bearer {TOKEN}'}}]}}]"
        ),
    );
    assert_ne!(with_token, yaml, "bootstrap rewritten");
    let proxy = start_proxy(&with_token).await;
    let ingress = proxy.listener_addr("ingress").expect("ingress from LDS");
    assert_eq!(get(ingress).await, (200, "a".into(), "v1".into()));
    assert_eq!(proxy_stat(&proxy, "control_plane.connected_state"), 1);
    proxy.stop().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
}

#[tokio::test]
async fn weir_reaches_weir_cp_over_mtls() {
    let pki = crate::auth::pki("mesh-mtls");
    let settings =
        weir_control_plane::settings::Settings::parse(&crate::auth::tls_settings(&pki), "test")
            .expect("settings");
    let a = backend("a").await;
    let cp = ControlPlane::open(None).expect("cp");
    cp.apply_text(
        weir_control_plane::operator::Target::All,
        &mesh_doc(&[(a.port(), 1)], "v1"),
        "test",
    )
    .expect("apply");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let xds = l.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(weir_control_plane::run(
        cp.clone(),
        l,
        weir_control_plane::RunOptions {
            settings,
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    // The ADS cluster speaks TLS with the proxy's client certificate (its SPIFFE SAN maps to
    // xds:read in weir-cp's settings) and verifies weir-cp against the test CA.
    let tls = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{filename: {chain}}}
            private_key: {{filename: {key}}}
          validation_context:
            trusted_ca: {{filename: {ca}}}
"#,
        chain = pki.proxy.0.display(),
        key = pki.proxy.1.display(),
        ca = pki.ca.display()
    );
    let yaml = bootstrap(xds, "DELTA_GRPC").replace(
        "    load_assignment:\n      cluster_name: weir-cp\n",
        &format!("{tls}    load_assignment:\n      cluster_name: weir-cp\n"),
    );
    assert!(yaml.contains("UpstreamTlsContext"));
    let proxy = start_proxy(&yaml).await;
    let ingress = proxy
        .listener_addr("ingress")
        .expect("ingress over mTLS ADS");
    assert_eq!(get(ingress).await, (200, "a".into(), "v1".into()));
    // A TLS cluster is a normal cluster (weir's upstream TLS): the ADS cluster is routable too.
    assert!(proxy.state.clusters.get("weir-cp").is_some());
    proxy.stop().await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, task).await;
}
