//! Two transparent weir sidecars, in real network namespaces, upgrade plain-text application
//! traffic to mTLS with workload identities from weir-cp's mesh CA.
//!
//! Topology (`proxy/tests/integration/netns.rs`, shared with the proxy's sidecar tests):
//! `cp` runs weir-cp (in-process, its xDS socket created inside the namespace), `a` is the
//! frontend (service account `frontend`) and `b` the backend (`backend`), each with
//! `weir-init` rules and a weir process running as uid 1337; `outsider` has no sidecar.
//! App A sends plain HTTP to B's address; A's sidecar intercepts it (15001 -> the 8080
//! listener), connects to B over mTLS checking B's SPIFFE ID; B's rules send that connection
//! to its 15006 listener, which requires A's client certificate, checks it with RBAC and
//! hands the request to app B on 127.0.0.1 with the caller's identity in XFCC.
//!
//! The weir binaries are the workspace's `target/<profile>/weir{,-init}` (built by
//! `cargo test --workspace`), or `WEIR_BIN` / `WEIR_INIT_BIN`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[path = "../../../proxy/tests/integration/netns.rs"]
mod netns;

use netns::{NS_WAIT, Net};

use crate::harness::{hcm, weir_cp_cluster};

const SDS: &str = "{ads: {}, resource_api_version: V3}";

/// `target/<profile>/<name>` next to this test binary (`target/<profile>/deps/...`), or the
/// path in `env`.
fn sibling_binary(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .ok_or("no target dir")?;
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not built (run `cargo build -p weir-proxy --bins` or set {env})",
            p.display()
        ))
    }
}

/// The application behind sidecar B: records every request's peer and XFCC header.
fn app_b(l: tokio::net::TcpListener, seen: Arc<Mutex<Vec<(SocketAddr, String)>>>) {
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let xfcc = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_default();
                        seen.lock().expect("seen").push((peer, xfcc.clone()));
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                format!("app-b saw xfcc={xfcc}"),
                            ))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

fn common(node_id: &str, sa: &str, xds: SocketAddr) -> String {
    format!(
        r#"
node:
  id: {node_id}
  cluster: {sa}
  metadata: {{NAMESPACE: shop, SERVICE_ACCOUNT: {sa}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: weir-cp}}}}]
"#
    ) + &weir_cp_cluster(xds)
}

const ORIGINAL_DST_FILTER: &str = r#"    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
"#;

/// Sidecar A: virtual outbound 15001 handing 8080 connections to an HTTP listener whose
/// ORIGINAL_DST cluster speaks mTLS and checks the backend's SPIFFE ID.
fn sidecar_a(xds: SocketAddr) -> String {
    common("frontend-1", "frontend", xds)
        + &format!(
            r#"  - name: "outbound|8080||backend"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs: [{{name: default, sds_config: {SDS}}}]
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{exact: "spiffe://cluster.local/ns/shop/sa/backend"}}
            validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {SDS}}}
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    use_original_dst: true
{ORIGINAL_DST_FILTER}    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  - name: 0.0.0.0_8080
    address: {{socket_address: {{address: 0.0.0.0, port_value: 8080}}}}
    bind_to_port: false
    filter_chains:
    - filters:
"#
        )
        + &hcm("outbound_0.0.0.0_8080", "outbound|8080||backend", "", "")
}

/// Sidecar B: virtual inbound 15006, chain for destination port 8080 requiring a mesh
/// client certificate, RBAC allowing only `sa/frontend`, XFCC with the caller's URI, then app
/// B on 127.0.0.1:8080.
fn sidecar_b(xds: SocketAddr) -> String {
    let rbac = r#"          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  frontend-only:
                    permissions: [{any: true}]
                    principals: [{authenticated: {principal_name: {exact: "spiffe://cluster.local/ns/shop/sa/frontend"}}}]
"#;
    let extra = "          forward_client_cert_details: SANITIZE_SET\n          set_current_client_cert_details: {uri: true}\n";
    common("backend-1", "backend", xds)
        + &format!(
            r#"  - name: "inbound|8080||"
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: "inbound|8080||"
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}
  listeners:
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
{ORIGINAL_DST_FILTER}    filter_chains:
    - filter_chain_match: {{destination_port: 8080}}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs: [{{name: default, sds_config: {SDS}}}]
            validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {SDS}}}
      filters:
"#
        )
        + &hcm("inbound_0.0.0.0_8080", "inbound|8080||", extra, rbac)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_upgrade_plain_text_to_mtls_with_weir_cp_identities() {
    const TEST: &str = "sidecars_upgrade_plain_text_to_mtls_with_weir_cp_identities";
    if netns::skip(TEST) {
        return;
    }
    let bins = sibling_binary("weir", "WEIR_BIN")
        .and_then(|w| Ok((w, sibling_binary("weir-init", "WEIR_INIT_BIN")?)));
    let (weir, weir_init) = match bins {
        Ok(b) => b,
        Err(why) => {
            if std::env::var("WEIR_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("{TEST}: WEIR_REQUIRE_NETNS=1 but {why}");
            }
            eprintln!("SKIPPED {TEST}: {why}");
            return;
        }
    };
    let (weir, weir_init) = (
        weir.to_string_lossy().into_owned(),
        weir_init.to_string_lossy().into_owned(),
    );
    let mut net = Net::new(&["cp", "a", "b", "outsider"]).expect("namespaces");
    let (cp_ns, a, b, outsider) = (net.ns("cp"), net.ns("a"), net.ns("b"), net.ns("outsider"));

    // weir-cp, its xDS socket inside the cp namespace. Without credentials weir-cp only
    // serves loopback addresses (auth is tested in `auth`), so it listens on the namespace's
    // 127.0.0.1 and a relay on the namespace's network address forwards to it.
    let xds_listener = netns::bind(&cp_ns, "127.0.0.1:0".parse().expect("addr"));
    let xds_loopback = xds_listener.local_addr().expect("xds addr");
    let relay = netns::bind(&cp_ns, cp_ns.addr(0));
    let xds = relay.local_addr().expect("relay addr");
    {
        let cp_ns = cp_ns.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = relay.accept().await else {
                    return;
                };
                let cp_ns = cp_ns.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = netns::connect(&cp_ns, xds_loopback).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
    }
    let cp = weir_control_plane::ControlPlane::open(None).expect("control plane");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cp_task = tokio::spawn(weir_control_plane::run(
        cp,
        xds_listener,
        weir_control_plane::RunOptions {
            api: None,
            config_dir: None,
            settings: Default::default(),
            s3: None,
        },
        async {
            let _ = stopped.await;
        },
    ));

    // App B on every address of its namespace, port 8080.
    let seen = Arc::new(Mutex::new(Vec::new()));
    app_b(
        netns::bind(&b, "0.0.0.0:8080".parse().expect("addr")),
        seen.clone(),
    );

    // weir-cp is reachable from both pods (before interception, and from the test's uid).
    for ns in [&a, &b] {
        netns::connect(ns, xds)
            .await
            .unwrap_or_else(|e| panic!("weir-cp at {xds} from {}: {e}", ns.name));
    }
    for role in ["a", "b"] {
        net.exec(role, &[&weir_init, "--proxy-uid", "1337"])
            .expect("weir-init");
    }
    let admin: SocketAddr = "127.0.0.1:15000".parse().expect("admin");
    let mut logs = Vec::new();
    for (role, yaml) in [("b", sidecar_b(xds)), ("a", sidecar_a(xds))] {
        let cfg = netns::temp_file("weir.yaml", &yaml);
        let log = netns::temp_file("weir.log", "");
        let cfg_s = cfg.to_string_lossy().into_owned();
        net.spawn_as(
            role,
            1337,
            &[
                &weir,
                "-c",
                &cfg_s,
                "--concurrency",
                "1",
                "--drain-time-s",
                "1",
            ],
            &log,
        );
        netns::wait_ready(&net.ns(role), admin, &log).await;
        logs.push(log);
    }
    let logs_text = || {
        logs.iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // App A speaks plain HTTP to B's address; its sidecar upgrades it.
    let (status, body) = netns::http_get(&a, b.addr(8080), "/orders")
        .await
        .expect("request from app A");
    assert_eq!(status, 200, "{body}\n{}", logs_text());
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/shop/sa/frontend"),
        "app B sees the caller's identity: {body}"
    );
    {
        let seen = seen.lock().expect("seen");
        assert_eq!(seen.len(), 1);
        // App B was reached by its sidecar over loopback, never from the network.
        assert!(seen[0].0.ip().is_loopback(), "{:?}", seen[0]);
        assert!(
            seen[0]
                .1
                .contains("URI=spiffe://cluster.local/ns/shop/sa/frontend")
        );
    }
    let sa = netns::stats(&a, admin).await;
    let sb = netns::stats(&b, admin).await;
    let get = |m: &std::collections::HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    // A: intercepted on 15001, handed to the 8080 listener, upstream TLS handshake.
    assert_eq!(
        get(&sa, "listener.0.0.0.0_8080.downstream_cx_total"),
        1,
        "{sa:?}"
    );
    assert_eq!(
        get(&sa, "cluster.outbound|8080||backend.upstream_cx_total"),
        1,
        "{sa:?}"
    );
    assert_eq!(
        get(&sa, "cluster.outbound|8080||backend.ssl.handshake"),
        1,
        "{sa:?}"
    );
    // B: the connection arrived on 15006 as TLS (handshake counted), RBAC allowed it.
    assert_eq!(
        get(&sb, "listener.0.0.0.0_15006.downstream_cx_total"),
        1,
        "{sb:?}"
    );
    assert_eq!(
        get(&sb, "listener.0.0.0.0_15006.ssl.handshake"),
        1,
        "{sb:?}"
    );
    assert_eq!(
        get(&sb, "http.inbound_0.0.0.0_8080.rbac.allowed"),
        1,
        "{sb:?}"
    );

    // Plain text from the network to B's port (a namespace without a sidecar) ends at B's
    // sidecar, which wants TLS: the app never sees it.
    let mut s = netns::connect(&outsider, b.addr(8080))
        .await
        .expect("connect from outsider");
    let _ = s
        .write_all(b"GET /plain HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(NS_WAIT, s.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("app-b"),
        "plain text refused: {}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(
        seen.lock().expect("seen").len(),
        1,
        "app B got no plain text"
    );
    let sb2 = netns::stats(&b, admin).await;
    assert_eq!(
        get(&sb2, "listener.0.0.0.0_15006.downstream_cx_total"),
        2,
        "the plain connection was intercepted too: {sb2:?}"
    );
    assert_eq!(get(&sb2, "listener.0.0.0.0_15006.ssl.handshake"), 1);

    drop(net);
    let _ = stop.send(());
    let _ = tokio::time::timeout(NS_WAIT, cp_task).await;
}
