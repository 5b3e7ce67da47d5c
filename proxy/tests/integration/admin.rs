//! Admin endpoints and stat values after a known number of requests.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::harness::*;

async fn admin_get(p: &Proxy, path: &str) -> (u16, String) {
    let (s, _, body) = get(p.admin(), "admin", path).await;
    (s.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_after_known_requests() {
    let (p, b) = proxy_to_backend("").await;
    for _ in 0..3 {
        let (s, _, _) = get(p.addr("http"), "x", "/").await;
        assert_eq!(s.as_u16(), 200);
    }
    let (s, _, _) = get(p.addr("http"), "x", "/status/503").await;
    assert_eq!(s.as_u16(), 503);
    let port = b.port();
    eventually("gauges back to baseline", || {
        p.stat("http.ingress.downstream_rq_active") == 0
    })
    .await;
    let (code, prom) = admin_get(&p, "/stats/prometheus").await;
    assert_eq!(code, 200);
    for line in [
        "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"b\"} 4",
        "envoy_cluster_upstream_rq_xx{envoy_cluster_name=\"b\",envoy_response_code_class=\"2\"} 3",
        "envoy_cluster_upstream_rq_xx{envoy_cluster_name=\"b\",envoy_response_code_class=\"5\"} 1",
        "envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=\"ingress\"} 4",
        "envoy_http_downstream_rq_xx{envoy_http_conn_manager_prefix=\"ingress\",envoy_response_code_class=\"2\"} 3",
        "envoy_http_downstream_cx_total{envoy_http_conn_manager_prefix=\"ingress\"} 4",
        "envoy_server_live 1",
    ] {
        assert!(prom.contains(line), "missing {line}\n{prom}");
    }
    assert!(
        prom.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"b\""),
        "{prom}"
    );
    assert!(
        prom.contains(
            "envoy_listener_downstream_cx_total{envoy_listener_address=\"127.0.0.1_0\"} 4"
        ),
        "{prom}"
    );
    let (_, text) = admin_get(&p, "/stats").await;
    assert!(text.contains("cluster.b.upstream_rq_total: 4"), "{text}");
    assert!(text.contains("http.ingress.downstream_rq_5xx: 1"), "{text}");
    let (_, clusters) = admin_get(&p, "/clusters").await;
    assert!(
        clusters.contains(&format!("b::127.0.0.1:{port}::rq_total::4")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("b::127.0.0.1:{port}::rq_error::1")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("b::127.0.0.1:{port}::health_flags::healthy")),
        "{clusters}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let (p, _b) = proxy_to_backend("").await;
    assert_eq!(admin_get(&p, "/ready").await, (200, "LIVE\n".to_string()));
    let (_, listeners) = admin_get(&p, "/listeners").await;
    assert!(
        listeners.contains(&format!("http::{}", p.addr("http"))),
        "{listeners}"
    );
    let (code, dump) = admin_get(&p, "/config_dump").await;
    assert_eq!(code, 200);
    let j: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let types: Vec<&str> = j["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .filter_map(|c| c["@type"].as_str())
        .collect();
    assert!(
        types.contains(&"type.googleapis.com/envoy.admin.v3.ListenersConfigDump"),
        "{types:?}"
    );
    assert!(
        types.contains(&"type.googleapis.com/envoy.admin.v3.ClustersConfigDump"),
        "{types:?}"
    );
    let (code, info) = admin_get(&p, "/server_info").await;
    assert_eq!(code, 200);
    let info: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(info["state"], "LIVE");
    // Mutations need POST.
    let (code, _) = admin_get(&p, "/healthcheck/fail").await;
    assert_eq!(code, 405);
    let req = Request::post("/healthcheck/fail")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, _, _) = send(p.admin(), req).await;
    assert_eq!(s.as_u16(), 200);
    assert!(
        !p.handle
            .state
            .healthy
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    let req = Request::post("/drain_listeners")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, _, _) = send(p.admin(), req).await;
    assert_eq!(s.as_u16(), 200);
    assert_eq!(admin_get(&p, "/ready").await.0, 503);
    let addr = p.addr("http");
    eventually("listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    p.stop().await;
}
