//! Two weir sidecars get workload certificates from weir-cp's mesh CA over SDS and talk
//! mTLS with SPIFFE IDs; the server sidecar's HTTP RBAC allows one client identity and denies
//! another, and forwards the caller's identity to the application in
//! `x-forwarded-client-cert`. No certificate file is handled anywhere.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::harness::{Server, WAIT, hcm, proxy_stat, weir_cp_cluster};

/// The application behind the server sidecar: answers with the XFCC header it received.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let xfcc = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(xfcc))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

const SDS: &str = "{ads: {}, resource_api_version: V3}";

fn common(node_id: &str, sa: &str, xds: SocketAddr) -> String {
    format!(
        r#"
node:
  id: {node_id}
  cluster: {sa}
  metadata: {{NAMESPACE: shop, SERVICE_ACCOUNT: {sa}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: weir-cp}}}}]
"#
    ) + &weir_cp_cluster(xds)
}

/// The server sidecar: mTLS inbound (SDS `default` + `ROOTCA`), RBAC allowing only
/// `sa/frontend`, XFCC with the caller's URI set, then the app.
fn server_sidecar(xds: SocketAddr, app: SocketAddr) -> String {
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
            r#"  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app}}}}}}}
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs: [{{name: default, sds_config: {SDS}}}]
            validation_context_sds_secret_config: {{name: ROOTCA, sds_config: {SDS}}}
      filters:
"#,
            app = app.port()
        )
        + &hcm("inbound", "app", extra, rbac)
}

/// A client sidecar (`sa`): plain outbound listener -> cluster `backend` over mTLS, checking
/// the server's SPIFFE ID.
fn client_sidecar(xds: SocketAddr, sa: &str, backend: SocketAddr) -> String {
    common(&format!("{sa}-1"), sa, xds)
        + &format!(
            r#"  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
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
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
"#,
            port = backend.port()
        )
        + &hcm("outbound", "backend", "", "")
}

async fn start_proxy(yaml: &str) -> weir_proxy::server::ServerHandle {
    let opts = weir_proxy::cli::Options {
        config_yaml: Some(yaml.to_string()),
        concurrency: Some(1),
        drain_time_s: 1,
        ..Default::default()
    };
    let snap = weir_proxy::config::load(&opts).expect("valid bootstrap");
    tokio::time::timeout(WAIT, weir_proxy::server::start(opts, snap))
        .await
        .expect("proxy finished its initial fetch (SDS secrets arrived)")
        .expect("proxy starts")
}

async fn get(addr: SocketAddr) -> (u16, String) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", "backend.shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tx.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn sidecars_get_certificates_from_weir_cp_and_rbac_checks_spiffe_ids() {
    let cp = Server::start().await;
    let app = app().await;
    let server = start_proxy(&server_sidecar(cp.xds, app)).await;
    let inbound = server.listener_addr("inbound").expect("inbound");
    let frontend = start_proxy(&client_sidecar(cp.xds, "frontend", inbound)).await;
    let batch = start_proxy(&client_sidecar(cp.xds, "batch", inbound)).await;

    // The sidecars started once their SDS secrets arrived (the init manager waits), so the
    // very first request works.
    let (status, xfcc) = get(frontend.listener_addr("outbound").expect("outbound")).await;
    assert_eq!(status, 200, "{xfcc}");
    assert!(
        xfcc.contains("URI=spiffe://cluster.local/ns/shop/sa/frontend"),
        "XFCC: {xfcc}"
    );
    // batch: the TLS handshake succeeds (same mesh CA), RBAC denies its identity.
    let (status, body) = get(batch.listener_addr("outbound").expect("outbound")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body, "RBAC: access denied");
    assert_eq!(proxy_stat(&server, "http.inbound.rbac.allowed"), 1);
    assert_eq!(proxy_stat(&server, "http.inbound.rbac.denied"), 1);

    // A plain-text client, and a TLS client without a mesh certificate, never reach the app.
    let mut s = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "plain text refused"
    );

    frontend.stop().await;
    batch.stop().await;
    server.stop().await;
    cp.stop().await;
}
