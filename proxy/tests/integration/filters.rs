//! HTTP filters (local_ratelimit, fault, health_check) and the network local_ratelimit, with
//! real backends; assertions on what the client sees and on stats.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Notify;

use crate::harness::*;

const LRL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const FAULT: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const ON: &str = "filter_enabled: {default_value: {numerator: 100}}, filter_enforced: {default_value: {numerator: 100}}";

/// One filter item for [`http_bootstrap_filters`].
fn filter(name: &str, type_url: &str, body: &str) -> String {
    format!("          - name: {name}\n            typed_config: {{'@type': {type_url}, {body}}}\n")
}

async fn proxy(vhosts: &str, b: &Backend, filters: &str) -> Proxy {
    Proxy::start(&http_bootstrap_filters(
        vhosts,
        &cluster("b", &[b.port()]),
        "",
        filters,
    ))
    .await
}

/// A GET from a client socket bound to `src` (another loopback address = another client IP).
async fn get_from(
    src: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src"))
        .expect("bind");
    let s = sock.connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "x");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

async fn admin_post(p: &Proxy, path: &str) {
    let req = Request::post(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, _, _) = send(p.admin(), req).await;
    assert_eq!(s, StatusCode::OK, "POST {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ratelimit_answers_429_after_exactly_the_bucket() {
    let b = Backend::start("b").await;
    let p = proxy(
        &all_to("b", "5s"),
        &b,
        &filter(
            "envoy.filters.http.local_ratelimit",
            LRL,
            &format!(
                "stat_prefix: lrl, {ON}, token_bucket: {{max_tokens: 3, tokens_per_fill: 1, fill_interval: 3600s}}, \
                 enable_x_ratelimit_headers: DRAFT_VERSION_03, \
                 response_headers_to_add: [{{header: {{key: x-local-rate-limit, value: 'true'}}}}]"
            ),
        ),
    )
    .await;
    for remaining in ["2", "1", "0"] {
        let (s, h, _) = get(p.addr("http"), "x", "/").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert_eq!(h["x-ratelimit-remaining"], remaining);
        assert!(h.get("x-envoy-ratelimited").is_none());
    }
    let (s, h, body) = get(p.addr("http"), "x", "/").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["x-envoy-ratelimited"], "true");
    assert_eq!(h["x-local-rate-limit"], "true");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(body, "local_rate_limited");
    assert_eq!(b.hits(), 3, "the limited request never reached the backend");
    assert_eq!(p.stat("lrl.http_local_rate_limit.enabled"), 4);
    assert_eq!(p.stat("lrl.http_local_rate_limit.ok"), 3);
    assert_eq!(p.stat("lrl.http_local_rate_limit.rate_limited"), 1);
    assert_eq!(p.stat("lrl.http_local_rate_limit.enforced"), 1);
    assert_eq!(p.stat("http.ingress.downstream_rq_4xx"), 1);
    let (_, _, prom) = get(p.admin(), "admin", "/stats/prometheus").await;
    let prom = String::from_utf8_lossy(&prom);
    assert!(
        prom.contains(
            "envoy_http_local_rate_limit_enforced{envoy_local_http_ratelimit_prefix=\"lrl\"} 1"
        ),
        "{prom}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptors_limit_each_client_ip_and_user_independently() {
    let b = Backend::start("b").await;
    let vhosts = "            - name: all\n              domains: [\"*\"]\n              routes:\n\
                  \x20             - match: {prefix: /ip}\n                route: {cluster: b, rate_limits: [{actions: [{remote_address: {}}]}]}\n\
                  \x20             - match: {prefix: /user}\n                route: {cluster: b, rate_limits: [{actions: [{request_headers: {header_name: x-user, descriptor_key: user}}]}]}\n";
    let p = proxy(
        vhosts,
        &b,
        &filter(
            "envoy.filters.http.local_ratelimit",
            LRL,
            &format!(
                "stat_prefix: d, {ON}, token_bucket: {{max_tokens: 1000, fill_interval: 3600s}}, \
                 descriptors: [{{entries: [{{key: remote_address}}], token_bucket: {{max_tokens: 2, fill_interval: 3600s}}}}, \
                 {{entries: [{{key: user}}], token_bucket: {{max_tokens: 1, fill_interval: 3600s}}}}, \
                 {{entries: [{{key: user, value: vip}}], token_bucket: {{max_tokens: 3, fill_interval: 3600s}}}}]"
            ),
        ),
    )
    .await;
    let a = p.addr("http");
    let status = |src: &'static str, path: &'static str, user: Option<&'static str>| async move {
        let h: Vec<(&str, &str)> = user.map(|u| ("x-user", u)).into_iter().collect();
        get_from(src, a, path, &h).await.0.as_u16()
    };
    // Per client IP: two each.
    assert_eq!(status("127.0.0.1", "/ip", None).await, 200);
    assert_eq!(status("127.0.0.1", "/ip", None).await, 200);
    assert_eq!(status("127.0.0.1", "/ip", None).await, 429);
    assert_eq!(status("127.0.0.2", "/ip", None).await, 200);
    assert_eq!(status("127.0.0.2", "/ip", None).await, 200);
    assert_eq!(status("127.0.0.2", "/ip", None).await, 429);
    // Per user: one each, three for the exact `vip` descriptor.
    assert_eq!(status("127.0.0.1", "/user", Some("alice")).await, 200);
    assert_eq!(status("127.0.0.1", "/user", Some("alice")).await, 429);
    assert_eq!(status("127.0.0.1", "/user", Some("bob")).await, 200);
    for _ in 0..3 {
        assert_eq!(status("127.0.0.1", "/user", Some("vip")).await, 200);
    }
    assert_eq!(status("127.0.0.1", "/user", Some("vip")).await, 429);
    // No x-user header: no descriptor, only the (large) default bucket.
    assert_eq!(status("127.0.0.1", "/user", None).await, 200);
    assert_eq!(p.stat("d.http_local_rate_limit.rate_limited"), 4);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_override_has_its_own_bucket() {
    let b = Backend::start("b").await;
    // Disabled at the listener (no filter_enabled); enabled on one route.
    let vhosts = format!(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n\
         \x20             - match: {{prefix: /limited}}\n                route: {{cluster: b}}\n\
         \x20               typed_per_filter_config:\n                  rl: {{'@type': {LRL}, stat_prefix: route, {ON}, token_bucket: {{max_tokens: 1, fill_interval: 3600s}}}}\n\
         \x20             - match: {{prefix: /}}\n                route: {{cluster: b}}\n"
    );
    let p = proxy(
        &vhosts,
        &b,
        &filter(
            "rl",
            LRL,
            "stat_prefix: listener, token_bucket: {max_tokens: 1, fill_interval: 3600s}",
        ),
    )
    .await;
    assert_eq!(get(p.addr("http"), "x", "/limited").await.0, StatusCode::OK);
    assert_eq!(
        get(p.addr("http"), "x", "/limited").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    for _ in 0..3 {
        assert_eq!(get(p.addr("http"), "x", "/free").await.0, StatusCode::OK);
    }
    assert_eq!(p.stat("route.http_local_rate_limit.enforced"), 1);
    assert_eq!(p.stat("listener.http_local_rate_limit.enabled"), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_local_ratelimit_closes_the_connection_over_the_limit() {
    let b = Backend::start("b").await;
    let yaml = http_bootstrap(&all_to("b", "5s"), &cluster("b", &[b.port()]), "").replacen(
        "      - name: envoy.filters.network.http_connection_manager\n",
        "      - name: envoy.filters.network.local_ratelimit\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit\n          stat_prefix: conns\n          token_bucket: {max_tokens: 2, fill_interval: 3600s}\n      - name: envoy.filters.network.http_connection_manager\n",
        1,
    );
    let p = Proxy::start(&yaml).await;
    let req = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    for _ in 0..2 {
        let out = raw(p.addr("http"), req, Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    let out = raw(p.addr("http"), req, Duration::from_secs(5)).await;
    assert_eq!(out, "", "the third connection is closed without a response");
    assert_eq!(b.hits(), 2);
    assert_eq!(p.stat("local_rate_limit.conns.rate_limited"), 1);
    let (_, _, prom) = get(p.admin(), "admin", "/stats/prometheus").await;
    let prom = String::from_utf8_lossy(&prom);
    assert!(
        prom.contains(
            "envoy_local_rate_limit_rate_limited{envoy_local_network_ratelimit_prefix=\"conns\"} 1"
        ),
        "{prom}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aborts_with_http_and_grpc_status() {
    let b = Backend::start("b").await;
    let vhosts = format!(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n\
         \x20             - match: {{prefix: /grpc}}\n                route: {{cluster: b}}\n\
         \x20               typed_per_filter_config:\n                  envoy.filters.http.fault: {{'@type': {FAULT}, abort: {{grpc_status: 14, percentage: {{numerator: 100}}}}}}\n\
         \x20             - match: {{prefix: /}}\n                route: {{cluster: b}}\n"
    );
    let p = proxy(
        &vhosts,
        &b,
        &filter(
            "envoy.filters.http.fault",
            FAULT,
            "abort: {http_status: 503, percentage: {numerator: 100}, response_body: injected}",
        ),
    )
    .await;
    let (s, _, body) = get(p.addr("http"), "x", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "injected");
    let mut h2 = h2_client(p.addr("http")).await;
    let req = Request::post("http://x/grpc/Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = h2.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(b.hits(), 0);
    assert_eq!(p.stat("http.ingress.fault.aborts_injected"), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_and_header_controlled_faults() {
    let b = Backend::start("b").await;
    let p = proxy(
        &all_to("b", "5s"),
        &b,
        &filter(
            "envoy.filters.http.fault",
            FAULT,
            "abort: {header_abort: {}, percentage: {numerator: 100}}, delay: {header_delay: {}, percentage: {numerator: 100}}",
        ),
    )
    .await;
    let a = p.addr("http");
    // No fault headers: nothing injected.
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);
    assert_eq!(p.stat("http.ingress.fault.delays_injected"), 0);
    // A delay: the response still arrives from the backend.
    let (s, _, body) = get_from(
        "127.0.0.1",
        a,
        "/",
        &[("x-envoy-fault-delay-request", "100")],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&body)["backend"], "b");
    assert_eq!(p.stat("http.ingress.fault.delays_injected"), 1);
    // An abort chosen by header.
    let (s, _, _) = get_from(
        "127.0.0.1",
        a,
        "/",
        &[("x-envoy-fault-abort-request", "418")],
    )
    .await;
    assert_eq!(s, StatusCode::IM_A_TEAPOT);
    // ... unless its percentage header says 0.
    let (s, _, _) = get_from(
        "127.0.0.1",
        a,
        "/",
        &[
            ("x-envoy-fault-abort-request", "418"),
            ("x-envoy-fault-abort-request-percentage", "0"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p.stat("http.ingress.fault.aborts_injected"), 1);
    assert_eq!(b.hits(), 3);
    p.stop().await;

    // A fixed delay and a response rate limit from config: the whole body still arrives.
    let p = proxy(
        &all_to("b", "5s"),
        &b,
        &filter(
            "envoy.filters.http.fault",
            FAULT,
            "delay: {fixed_delay: 0.05s, percentage: {numerator: 100}}, \
             response_rate_limit: {fixed_limit: {limit_kbps: 1024}, percentage: {numerator: 100}}",
        ),
    )
    .await;
    let (s, _, body) = get(p.addr("http"), "x", "/big/200000").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), 200_000);
    assert_eq!(p.stat("http.ingress.fault.delays_injected"), 1);
    assert_eq!(p.stat("http.ingress.fault.response_rl_injected"), 1);
    eventually("fault slot released", || {
        p.stat("http.ingress.fault.active_faults") == 0
    })
    .await;
    p.stop().await;
}

/// A backend whose `/hold` requests wait until released; `/` answers at once.
async fn holding_backend() -> (SocketAddr, Arc<Notify>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let release = Arc::new(Notify::new());
    let held = Arc::new(AtomicUsize::new(0));
    let (r, h) = (release.clone(), held.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (r, h) = (r.clone(), h.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"GET /hold") {
                    h.fetch_add(1, Ordering::SeqCst);
                    r.notified().await;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, release, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_faults_overflow_skips_the_fault() {
    let (baddr, release, held) = holding_backend().await;
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "10s"),
        &cluster("b", &[baddr.port()]),
        "",
        &filter(
            "envoy.filters.http.fault",
            FAULT,
            "delay: {fixed_delay: 0.01s, percentage: {numerator: 100}}, max_active_faults: 1",
        ),
    ))
    .await;
    let a = p.addr("http");
    let first = tokio::spawn(async move { get(a, "x", "/hold").await });
    eventually("first request held by the backend", || {
        held.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(p.stat("http.ingress.fault.active_faults"), 1);
    // The only fault slot is taken: no delay for this one.
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);
    assert_eq!(p.stat("http.ingress.fault.faults_overflow"), 1);
    assert_eq!(p.stat("http.ingress.fault.delays_injected"), 1);
    release.notify_one();
    let (s, _, body) = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("first finishes")
        .expect("task");
    assert_eq!((s, body.as_ref()), (StatusCode::OK, &b"ok"[..]));
    eventually("fault slot released", || {
        p.stat("http.ingress.fault.active_faults") == 0
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_filter_follows_healthcheck_fail_and_ok() {
    let b = Backend::start("b").await;
    let p = proxy(
        &all_to("b", "5s"),
        &b,
        &filter(
            "envoy.filters.http.health_check",
            "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode: false, headers: [{name: ':path', string_match: {exact: /healthz}}]",
        ),
    )
    .await;
    let a = p.addr("http");
    assert_eq!(get(a, "x", "/healthz").await.0, StatusCode::OK);
    let (s, h, _) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("x-envoy-immediate-health-check-fail").is_none());
    assert_eq!(b.hits(), 1, "health checks are answered by weir itself");

    admin_post(&p, "/healthcheck/fail").await;
    assert_eq!(
        get(a, "x", "/healthz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (s, h, _) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::OK, "traffic still flows");
    assert_eq!(h["x-envoy-immediate-health-check-fail"], "true");

    admin_post(&p, "/healthcheck/ok").await;
    assert_eq!(get(a, "x", "/healthz").await.0, StatusCode::OK);
    assert_eq!(b.hits(), 2);
    p.stop().await;
}
