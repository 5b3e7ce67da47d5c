//! Active health checks, outlier detection and `x-envoy-immediate-health-check-fail` against
//! real backends that fail on purpose; assertions on what clients see, `/clusters` and stats.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::harness::*;

/// A backend whose answers the test controls: `/healthz` answers `health`; every other path
/// answers `status` with the backend's name as the body, plus
/// `x-envoy-immediate-health-check-fail` while `immediate_fail` is set.
struct Ctl {
    addr: SocketAddr,
    health: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
    immediate_fail: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    hc_hits: Arc<AtomicUsize>,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    /// The last health-check request: HTTP version, authority (Host or :authority), headers.
    last_hc: Arc<Mutex<Option<(http::Version, String, http::HeaderMap)>>>,
}

impl Ctl {
    async fn start(name: &'static str) -> Ctl {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let ctl = Ctl {
            addr,
            health: Arc::new(AtomicU16::new(200)),
            status: Arc::new(AtomicU16::new(200)),
            immediate_fail: Arc::new(AtomicBool::new(false)),
            hits: Arc::new(AtomicUsize::new(0)),
            hc_hits: Arc::new(AtomicUsize::new(0)),
            last_hc: Arc::new(Mutex::new(None)),
            conns: Arc::new(AtomicUsize::new(0)),
        };
        let conns = ctl.conns.clone();
        let (health, status, fail, hits, hc_hits, last_hc) = (
            ctl.health.clone(),
            ctl.status.clone(),
            ctl.immediate_fail.clone(),
            ctl.hits.clone(),
            ctl.hc_hits.clone(),
            ctl.last_hc.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                conns.fetch_add(1, Ordering::SeqCst);
                let (health, status, fail, hits, hc_hits, last_hc) = (
                    health.clone(),
                    status.clone(),
                    fail.clone(),
                    hits.clone(),
                    hc_hits.clone(),
                    last_hc.clone(),
                );
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let mut r = Response::new(Full::new(Bytes::from(name)));
                        if req.uri().path() == "/healthz" {
                            hc_hits.fetch_add(1, Ordering::SeqCst);
                            let authority = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .or_else(|| {
                                    req.headers()
                                        .get(http::header::HOST)
                                        .and_then(|h| h.to_str().ok())
                                        .map(str::to_string)
                                })
                                .unwrap_or_default();
                            if let Ok(mut g) = last_hc.lock() {
                                *g = Some((req.version(), authority, req.headers().clone()));
                            }
                            r.headers_mut().insert(
                                "x-envoy-upstream-healthchecked-cluster",
                                http::HeaderValue::from_static(name),
                            );
                            *r.status_mut() = StatusCode::from_u16(health.load(Ordering::SeqCst))
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        } else {
                            hits.fetch_add(1, Ordering::SeqCst);
                            *r.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst))
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                            if fail.load(Ordering::SeqCst) {
                                r.headers_mut().insert(
                                    "x-envoy-immediate-health-check-fail",
                                    http::HeaderValue::from_static("true"),
                                );
                            }
                        }
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        ctl
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn admin_text(p: &Proxy, path: &str) -> String {
    let (s, _, body) = get(p.admin(), "admin", path).await;
    assert_eq!(s, StatusCode::OK, "{path}");
    String::from_utf8_lossy(&body).into_owned()
}

/// The `health_flags` value `/clusters` prints for `cluster`'s host on `port`.
async fn flags(p: &Proxy, cluster: &str, port: u16) -> String {
    let text = admin_text(p, "/clusters").await;
    let prefix = format!("{cluster}::127.0.0.1:{port}::health_flags::");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .to_string()
}

/// Poll `/clusters` until the host's flags equal `want` (bounded: 10 s).
async fn wait_flags(p: &Proxy, cluster: &str, port: u16, want: &str) {
    let mut last = String::new();
    for _ in 0..400 {
        last = flags(p, cluster, port).await;
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{cluster} host {port}: health_flags stayed {last:?}, wanted {want:?}");
}

/// Send GETs (at most 20) until `n` non-200 answers were seen; returns their statuses.
async fn until_errors(p: &Proxy, n: usize) -> Vec<u16> {
    let mut other = Vec::new();
    for _ in 0..20 {
        let (_, o) = spray(p, 1).await;
        other.extend(o);
        if other.len() >= n {
            break;
        }
    }
    other
}

/// `n` GETs through the proxy; returns the bodies (backend names) of the 200 answers and the
/// statuses of the others.
async fn spray(p: &Proxy, n: usize) -> (Vec<String>, Vec<u16>) {
    let (mut ok, mut other) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (s, _, body) = get(p.addr("http"), "x", "/work").await;
        if s == StatusCode::OK {
            ok.push(String::from_utf8_lossy(&body).into_owned());
        } else {
            other.push(s.as_u16());
        }
    }
    (ok, other)
}

fn with_extra(cluster_yaml: String, extra: &str) -> String {
    format!("{cluster_yaml}{extra}")
}

const HTTP_HC: &str = "    health_checks:
    - timeout: 1s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 2
      healthy_threshold: 2
      http_health_check: {path: /healthz}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_leaves_rotation_and_comes_back() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port(), b.port()]), HTTP_HC),
        "",
    ))
    .await;
    // Cluster warming: the first requests already find both hosts checked and healthy.
    let (ok, other) = spray(&p, 10).await;
    assert!(other.is_empty(), "{other:?}");
    assert!(
        ok.contains(&"a".to_string()) && ok.contains(&"b".to_string()),
        "{ok:?}"
    );
    assert_eq!(flags(&p, "svc", a.port()).await, "healthy");
    assert_eq!(p.stat("cluster.svc.health_check.healthy"), 2);

    // a's health endpoint fails: an unexpected status fails the host at once.
    a.health.store(503, Ordering::SeqCst);
    wait_flags(&p, "svc", a.port(), "/failed_active_hc").await;
    assert_eq!(flags(&p, "svc", b.port()).await, "healthy");
    assert_eq!(p.stat("cluster.svc.health_check.healthy"), 1);
    let before = a.hits();
    let (ok, other) = spray(&p, 10).await;
    assert!(other.is_empty(), "{other:?}");
    assert!(ok.iter().all(|n| n == "b"), "{ok:?}");
    assert_eq!(a.hits(), before, "no traffic to the failed host");
    // The JSON form says the same.
    let v = json(&Bytes::from(admin_text(&p, "/clusters?format=json").await));
    let hosts = v["cluster_statuses"][0]["host_statuses"]
        .as_array()
        .expect("hosts");
    let ha = hosts
        .iter()
        .find(|h| h["address"]["socket_address"]["port_value"] == a.port())
        .expect("host a");
    assert_eq!(ha["health_status"]["failed_active_health_check"], true);
    assert_eq!(ha["health_status"]["eds_health_status"], "HEALTHY");

    // Healthy again: back after healthy_threshold passing checks.
    a.health.store(200, Ordering::SeqCst);
    wait_flags(&p, "svc", a.port(), "healthy").await;
    let (ok, _) = spray(&p, 6).await;
    assert!(ok.contains(&"a".to_string()), "{ok:?}");
    assert!(p.stat("cluster.svc.health_check.attempt") >= 4);
    assert!(p.stat("cluster.svc.health_check.success") >= 3);
    assert!(p.stat("cluster.svc.health_check.failure") >= 1);
    assert_eq!(p.stat("cluster.svc.health_check.network_failure"), 0);
    assert_eq!(p.stat("cluster.svc.health_check.healthy"), 2);
    // Prometheus names.
    let (_, _, prom) = get(p.admin(), "admin", "/stats/prometheus").await;
    let prom = String::from_utf8_lossy(&prom);
    assert!(
        prom.contains("envoy_cluster_health_check_attempt{envoy_cluster_name=\"svc\"}"),
        "{prom}"
    );
    assert!(prom.contains("envoy_cluster_health_check_healthy{envoy_cluster_name=\"svc\"} 2"));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_needs_the_unhealthy_threshold() {
    let a = Ctl::start("a").await;
    let hc = "    health_checks:
    - timeout: 1s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 3
      healthy_threshold: 1
      http_health_check: {path: /healthz, retriable_statuses: [{start: 503, end: 504}]}
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port()]), hc),
        "",
    ))
    .await;
    assert_eq!(flags(&p, "svc", a.port()).await, "healthy");
    a.health.store(503, Ordering::SeqCst);
    let start = a.hc_hits.load(Ordering::SeqCst);
    wait_flags(&p, "svc", a.port(), "/failed_active_hc").await;
    // Three failing checks were needed (a retriable status is not an immediate failure).
    assert!(a.hc_hits.load(Ordering::SeqCst) - start >= 3);
    // Retriable statuses are active failures but not network ones.
    assert_eq!(p.stat("cluster.svc.health_check.network_failure"), 0);
    assert!(p.stat("cluster.svc.health_check.failure") >= 3);
    assert_eq!(p.stat("cluster.svc.health_check.healthy"), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_closed_port_and_payloads() {
    let echo = tcp_echo().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let tcp_connect = "    health_checks:
    - timeout: 0.5s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {}
";
    // "PING" out, "PING" back from the echo server.
    let tcp_payload = "    health_checks:
    - timeout: 0.5s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {send: {text: \"50494e47\"}, receive: [{text: \"50494e47\"}]}
";
    // Expects "PONG", which the echo server never sends: the check times out.
    let tcp_mismatch = "    health_checks:
    - timeout: 0.2s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {send: {text: \"50494e47\"}, receive: [{text: \"504f4e47\"}]}
";
    let clusters = format!(
        "{}{}{}",
        with_extra(cluster("conn", &[echo.port(), closed]), tcp_connect),
        with_extra(cluster("payload", &[echo.port()]), tcp_payload),
        with_extra(cluster("mismatch", &[echo.port()]), tcp_mismatch),
    );
    let p = Proxy::start(&http_bootstrap(&all_to("conn", "5s"), &clusters, "")).await;
    assert_eq!(flags(&p, "conn", echo.port()).await, "healthy");
    assert_eq!(flags(&p, "conn", closed).await, "/failed_active_hc");
    assert_eq!(flags(&p, "payload", echo.port()).await, "healthy");
    assert_eq!(
        flags(&p, "mismatch", echo.port()).await,
        "/failed_active_hc"
    );
    assert!(p.stat("cluster.conn.health_check.network_failure") >= 1);
    assert!(p.stat("cluster.mismatch.health_check.network_failure") >= 1);
    assert_eq!(p.stat("cluster.payload.health_check.failure"), 0);
    assert_eq!(p.stat("cluster.conn.health_check.healthy"), 1);
    // Keeps checking: the closed port stays failed, the echo host healthy.
    let attempts = p.stat("cluster.conn.health_check.attempt");
    eventually("more checks", || {
        p.stat("cluster.conn.health_check.attempt") >= attempts + 4
    })
    .await;
    assert_eq!(flags(&p, "conn", closed).await, "/failed_active_hc");
    assert_eq!(flags(&p, "conn", echo.port()).await, "healthy");
    p.stop().await;
}

fn listener_stream(l: TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_not_serving_is_unhealthy() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("weir.svc", tonic_health::ServingStatus::NotServing)
        .await;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let g = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(listener_stream(l))
            .await;
    });
    let hc = "    http2_protocol_options: {}
    health_checks:
    - timeout: 1s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 2
      healthy_threshold: 1
      grpc_health_check: {service_name: weir.svc}
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("g", "5s"),
        &with_extra(cluster("g", &[g.port()]), hc),
        "",
    ))
    .await;
    assert_eq!(flags(&p, "g", g.port()).await, "/failed_active_hc");
    reporter
        .set_service_status("weir.svc", tonic_health::ServingStatus::Serving)
        .await;
    wait_flags(&p, "g", g.port(), "healthy").await;
    // NOT_SERVING is an active failure: unhealthy at once, despite unhealthy_threshold 2.
    reporter
        .set_service_status("weir.svc", tonic_health::ServingStatus::NotServing)
        .await;
    wait_flags(&p, "g", g.port(), "/failed_active_hc").await;
    assert_eq!(p.stat("cluster.g.health_check.network_failure"), 0);
    assert!(p.stat("cluster.g.health_check.success") >= 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_then_host_returns() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    let od = "    outlier_detection:
      consecutive_5xx: 3
      interval: 0.1s
      base_ejection_time: 1s
      max_ejection_percent: 50
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port(), b.port()]), od),
        "",
    ))
    .await;
    a.status.store(503, Ordering::SeqCst);
    // Three 503s in a row from a eject it.
    assert_eq!(until_errors(&p, 3).await, vec![503, 503, 503]);
    assert_eq!(flags(&p, "svc", a.port()).await, "/failed_outlier_check");
    assert_eq!(flags(&p, "svc", b.port()).await, "healthy");
    assert_eq!(p.stat("cluster.svc.outlier_detection.ejections_active"), 1);
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_enforced_consecutive_5xx"),
        1
    );
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_detected_consecutive_5xx"),
        1
    );
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_enforced_total"),
        1
    );
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_overflow"),
        0
    );
    // Everything goes to b while a is ejected.
    let before = a.hits();
    let (ok, other) = spray(&p, 8).await;
    assert!(other.is_empty(), "{other:?}");
    assert!(ok.iter().all(|n| n == "b"), "{ok:?}");
    assert_eq!(a.hits(), before);

    // a recovers; it is back after base_ejection_time (checked on the 100 ms sweep).
    a.status.store(200, Ordering::SeqCst);
    wait_flags(&p, "svc", a.port(), "healthy").await;
    assert_eq!(p.stat("cluster.svc.outlier_detection.ejections_active"), 0);
    let (ok, other) = spray(&p, 6).await;
    assert!(other.is_empty(), "{other:?}");
    assert!(ok.contains(&"a".to_string()), "{ok:?}");
    let (_, _, prom) = get(p.admin(), "admin", "/stats/prometheus").await;
    let prom = String::from_utf8_lossy(&prom);
    assert!(prom.contains(
        "envoy_cluster_outlier_detection_ejections_enforced_total{envoy_cluster_name=\"svc\"} 1"
    ));
    assert!(prom.contains(
        "envoy_cluster_outlier_detection_ejections_active{envoy_cluster_name=\"svc\"} 0"
    ));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_overflows() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    // Default max_ejection_percent (10%): ejecting 1 of 2 hosts is not allowed.
    let od = "    outlier_detection: {consecutive_5xx: 2, interval: 0.1s}\n";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port(), b.port()]), od),
        "",
    ))
    .await;
    a.status.store(500, Ordering::SeqCst);
    assert_eq!(until_errors(&p, 2).await, vec![500, 500]);
    assert_eq!(flags(&p, "svc", a.port()).await, "healthy");
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_overflow"),
        1
    );
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_detected_consecutive_5xx"),
        1
    );
    assert_eq!(p.stat("cluster.svc.outlier_detection.ejections_active"), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_health_check_fail_header_fails_the_host() {
    let a = Ctl::start("a").await;
    let b = Ctl::start("b").await;
    // Slow checks and healthy_threshold 3 keep the failure visible for a while.
    let hc = "    health_checks:
    - timeout: 1s
      interval: 0.3s
      no_traffic_interval: 0.3s
      unhealthy_threshold: 5
      healthy_threshold: 3
      http_health_check: {path: /healthz}
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port(), b.port()]), hc),
        "",
    ))
    .await;
    a.immediate_fail.store(true, Ordering::SeqCst);
    // Requests until one reaches a.
    for _ in 0..10 {
        let (s, h, body) = get(p.addr("http"), "x", "/work").await;
        assert_eq!(s, StatusCode::OK);
        if &body[..] == b"a" {
            assert!(h.contains_key("x-envoy-immediate-health-check-fail"));
            break;
        }
    }
    assert_eq!(a.hits(), 1);
    a.immediate_fail.store(false, Ordering::SeqCst);
    assert_eq!(flags(&p, "svc", a.port()).await, "/failed_active_hc");
    assert_eq!(p.stat("cluster.svc.health_check.passive_failure"), 1);
    let (ok, _) = spray(&p, 4).await;
    assert!(ok.iter().all(|n| n == "b"), "{ok:?}");
    // Passing checks bring it back.
    wait_flags(&p, "svc", a.port(), "healthy").await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_request_shape_h1_h2_and_service_name() {
    let a = Ctl::start("svc-a").await;
    let b = Ctl::start("svc-b").await;
    let h1 = "    health_checks:
    - timeout: 1s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      http_health_check:
        path: /healthz
        request_headers_to_add: [{header: {key: x-hc, value: weir}}]
        service_name_matcher: {prefix: svc-}
";
    // HTTP/2 to b with an explicit host; the matcher wants a name b does not report.
    let h2 = "    health_checks:
    - timeout: 1s
      interval: 0.1s
      no_traffic_interval: 0.1s
      unhealthy_threshold: 1
      healthy_threshold: 1
      http_health_check:
        path: /healthz
        host: hc.internal
        codec_client_type: HTTP2
        service_name_matcher: {exact: svc-a}
";
    let clusters = format!(
        "{}{}",
        with_extra(cluster("one", &[a.port()]), h1),
        with_extra(cluster("two", &[b.port()]), h2)
    );
    let p = Proxy::start(&http_bootstrap(&all_to("one", "5s"), &clusters, "")).await;
    assert_eq!(flags(&p, "one", a.port()).await, "healthy");
    assert_eq!(flags(&p, "two", b.port()).await, "/failed_active_hc");
    assert!(p.stat("cluster.one.health_check.verify_cluster") >= 1);
    assert!(p.stat("cluster.two.health_check.verify_cluster") >= 1);

    let (v, authority, headers) = a.last_hc.lock().expect("lock").clone().expect("checked");
    assert_eq!(v, http::Version::HTTP_11);
    assert_eq!(authority, "one", "Host defaults to the cluster name");
    assert_eq!(headers["user-agent"], "Envoy/HC");
    assert_eq!(headers["x-hc"], "weir");
    let (v, authority, headers) = b.last_hc.lock().expect("lock").clone().expect("checked");
    assert_eq!(v, http::Version::HTTP_2);
    assert_eq!(authority, "hc.internal");
    assert_eq!(headers["user-agent"], "Envoy/HC");
    // With reuse_connection (default) the checks share one connection per host.
    eventually("several checks", || a.hc_hits.load(Ordering::SeqCst) >= 4).await;
    assert_eq!(a.conns.load(Ordering::SeqCst), 1);
    assert_eq!(b.conns.load(Ordering::SeqCst), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_connection_false_reconnects_every_check() {
    let a = Ctl::start("a").await;
    let hc = "    health_checks:
    - timeout: 1s
      interval: 0.05s
      no_traffic_interval: 0.05s
      unhealthy_threshold: 1
      healthy_threshold: 1
      reuse_connection: false
      http_health_check: {path: /healthz}
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port()]), hc),
        "",
    ))
    .await;
    eventually("several checks", || a.hc_hits.load(Ordering::SeqCst) >= 4).await;
    // One connection per check (a connection is counted before its request).
    let checks = a.hc_hits.load(Ordering::SeqCst);
    let conns = a.conns.load(Ordering::SeqCst);
    assert!(
        conns >= checks && checks >= 4,
        "{conns} connections for {checks} checks"
    );
    assert_eq!(flags(&p, "svc", a.port()).await, "healthy");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_eject_by_local_origin_streak() {
    let a = Ctl::start("a").await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let od = "    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 2
      interval: 0.1s
      base_ejection_time: 30s
      max_ejection_percent: 50
";
    let p = Proxy::start(&http_bootstrap(
        &all_to("svc", "5s"),
        &with_extra(cluster("svc", &[a.port(), closed]), od),
        "",
    ))
    .await;
    // The closed port answers nothing: the client sees 503 (UF) twice, then the host is out.
    assert_eq!(until_errors(&p, 2).await, vec![503, 503]);
    assert_eq!(flags(&p, "svc", closed).await, "/failed_outlier_check");
    let (ok, other) = spray(&p, 6).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok.len(), 6);
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_enforced_consecutive_local_origin_failure"),
        1
    );
    // With the split, connect failures are not 5xx for the external-origin streaks.
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_detected_consecutive_5xx"),
        0
    );
    assert_eq!(
        p.stat("cluster.svc.outlier_detection.ejections_detected_consecutive_gateway_failure"),
        0
    );
    p.stop().await;
}
