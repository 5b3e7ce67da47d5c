//! Retries, timeouts, circuit breakers and mirroring against backends that fail on purpose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::harness::{Backend, Proxy, cluster, eventually, get, http_bootstrap, json, send};

/// What a [`Flaky`] backend does for its n-th request (0-based): status and delay.
type Script = Arc<dyn Fn(usize) -> (u16, Duration) + Send + Sync>;

/// A backend whose answers follow a script; it echoes the request body and names itself.
struct Flaky {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Flaky {
    async fn start(name: &'static str, script: Script) -> Flaky {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (h, script) = (h.clone(), script.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (h, script) = (h.clone(), script.clone());
                        async move {
                            let n = h.fetch_add(1, Ordering::SeqCst);
                            let (status, delay) = script(n);
                            let attempt = req
                                .headers()
                                .get("x-envoy-attempt-count")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.map(|c| c.to_bytes());
                            tokio::time::sleep(delay).await;
                            let mut r = Response::new(Full::new(body.unwrap_or_default()));
                            *r.status_mut() = StatusCode::from_u16(status).expect("status");
                            r.headers_mut()
                                .insert("x-backend", name.parse().expect("name"));
                            r.headers_mut()
                                .insert("x-seen-attempt", attempt.parse().expect("attempt"));
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Flaky { addr, hits }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn script(f: impl Fn(usize) -> (u16, Duration) + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

/// A port with nothing listening (bound, then closed).
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// One catch-all virtual host; `route` is the YAML flow mapping of the route action and
/// `vhost_extra` extra virtual host fields (each line indented by 14 spaces).
fn vhost(route: &str, vhost_extra: &str) -> String {
    format!(
        "            - name: all\n              domains: [\"*\"]\n{vhost_extra}              routes:\n              - match: {{prefix: /}}\n                route: {route}\n"
    )
}

/// One catch-all virtual host with several routes: `(prefix, route fields)`, where the route
/// fields are YAML lines (separated by `\n`) of the route, e.g. `route: {cluster: c}`.
fn routes(rs: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n",
    );
    for (prefix, fields) in rs {
        out.push_str(&format!("              - match: {{prefix: {prefix}}}\n"));
        for line in fields.lines() {
            out.push_str(&format!("                {line}\n"));
        }
    }
    out
}

fn post(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "svc")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("req")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_on_another_host_with_the_body() {
    let good = Flaky::start("good", script(|_| (200, Duration::ZERO))).await;
    let dead = dead_port().await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, retry_policy: {retry_on: connect-failure, num_retries: 2, retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {'@type': type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}], host_selection_retry_max_attempts: 3}}",
            "",
        ),
        &cluster("c", &[dead, good.port()]),
        "",
    ))
    .await;
    for i in 0..8 {
        let (status, h, body) = send(p.addr("http"), post("/", "payload")).await;
        assert_eq!(status, StatusCode::OK, "request {i}");
        assert_eq!(h["x-backend"], "good");
        assert_eq!(body, "payload", "the body is replayed on the retry");
    }
    assert_eq!(good.hits(), 8);
    let retries = p.stat("cluster.c.upstream_rq_retry");
    assert!(
        retries >= 1,
        "round robin sent some first attempts to the dead host"
    );
    assert_eq!(p.stat("cluster.c.upstream_rq_retry_success"), retries);
    assert_eq!(p.stat("cluster.c.upstream_cx_connect_fail"), retries);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_xx_retries_until_success_and_counts_attempts() {
    // Fails twice, then succeeds.
    let b = Flaky::start(
        "b",
        script(|n| (if n < 2 { 503 } else { 200 }, Duration::ZERO)),
    )
    .await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, retry_policy: {retry_on: 5xx, num_retries: 3, retry_back_off: {base_interval: 0.001s}}}",
            "              include_request_attempt_count: true\n              include_attempt_count_in_response: true\n",
        ),
        &cluster("c", &[b.port()]),
        "",
    ))
    .await;
    let (status, h, _) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.hits(), 3);
    assert_eq!(
        h["x-seen-attempt"], "3",
        "the upstream saw the attempt count"
    );
    assert_eq!(h["x-envoy-attempt-count"], "3", "and so does the client");
    assert_eq!(p.stat("cluster.c.upstream_rq_retry"), 2);
    assert_eq!(p.stat("cluster.c.upstream_rq_retry_success"), 1);
    assert_eq!(p.stat("cluster.c.upstream_rq_total"), 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_and_the_last_response_is_returned() {
    let b = Flaky::start("b", script(|_| (503, Duration::ZERO))).await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, retry_policy: {retry_on: gateway-error, num_retries: 2, retry_back_off: {base_interval: 0.001s}}}",
            "",
        ),
        &cluster("c", &[b.port()]),
        "",
    ))
    .await;
    let (status, h, _) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        h["x-backend"], "b",
        "the upstream's own response, not a local reply"
    );
    assert_eq!(b.hits(), 3);
    assert_eq!(p.stat("cluster.c.upstream_rq_retry"), 2);
    assert_eq!(p.stat("cluster.c.upstream_rq_retry_limit_exceeded"), 1);
    // Not retriable under gateway-error: 500 passes through at once.
    let b500 = Flaky::start("b500", script(|_| (500, Duration::ZERO))).await;
    let p2 = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, retry_policy: {retry_on: gateway-error, num_retries: 2}}",
            "",
        ),
        &cluster("c", &[b500.port()]),
        "",
    ))
    .await;
    let (status, _, _) = get(p2.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(b500.hits(), 1);
    p.stop().await;
    p2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_then_success_on_retry() {
    // The first attempt hangs for 5 s, the second answers at once.
    let b = Flaky::start(
        "b",
        script(|n| {
            (
                200,
                if n == 0 {
                    Duration::from_secs(5)
                } else {
                    Duration::ZERO
                },
            )
        }),
    )
    .await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, timeout: 10s, retry_policy: {retry_on: 5xx, num_retries: 1, per_try_timeout: 0.2s, retry_back_off: {base_interval: 0.001s}}}",
            "",
        ),
        &cluster("c", &[b.port()]),
        "",
    ))
    .await;
    let (status, h, _) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["x-backend"], "b");
    assert_eq!(b.hits(), 2);
    assert_eq!(p.stat("cluster.c.upstream_rq_per_try_timeout"), 1);
    assert_eq!(p.stat("cluster.c.upstream_rq_retry"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_headers_override_retries_and_timeouts() {
    let b = Flaky::start("b", script(|_| (503, Duration::ZERO))).await;
    let slow = Flaky::start("slow", script(|_| (200, Duration::from_secs(5)))).await;
    let p = Proxy::start(&http_bootstrap(
        &routes(&[
            ("/slow", "route: {cluster: slow, timeout: 30s}"),
            ("/", "route: {cluster: c}"),
        ]),
        &format!(
            "{}{}",
            cluster("c", &[b.port()]),
            cluster("slow", &[slow.port()])
        ),
        "",
    ))
    .await;
    // 127.0.0.1 is an internal client: its x-envoy-* control headers are honoured.
    let req = Request::get("/")
        .header("host", "svc")
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-max-retries", "3")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (status, _, _) = send(p.addr("http"), req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.hits(), 4, "1 attempt + x-envoy-max-retries");
    let req = Request::get("/slow")
        .header("host", "svc")
        .header("x-envoy-upstream-rq-timeout-ms", "200")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (status, _, body) = send(p.addr("http"), req).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "upstream request timeout");
    assert_eq!(p.stat("cluster.slow.upstream_rq_timeout"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_header_is_honoured_up_to_the_cap() {
    let slow = Flaky::start("slow", script(|_| (200, Duration::from_secs(5)))).await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, timeout: 30s, max_stream_duration: {grpc_timeout_header_max: 0.3s}}",
            "",
        ),
        &cluster("c", &[slow.port()]),
        "",
    ))
    .await;
    // The client allows 60 s; the cap (0.3 s) wins. The reply is gRPC-shaped.
    let req = Request::post("/svc.Svc/Call")
        .header("host", "svc")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "60S")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (status, h, _) = send(p.addr("http"), req).await;
    assert_eq!(status, StatusCode::OK);
    // Envoy maps its 504 local reply to UNAVAILABLE.
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(p.stat("cluster.c.upstream_rq_timeout"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_buffer_limit_is_not_retried() {
    let b = Flaky::start(
        "b",
        script(|n| (if n == 0 { 503 } else { 200 }, Duration::ZERO)),
    )
    .await;
    let p = Proxy::start(&http_bootstrap(
        &routes(&[
            ("/", "request_body_buffer_limit: 8\nroute: {cluster: c, retry_policy: {retry_on: 5xx, num_retries: 2}}"),
        ]),
        &cluster("c", &[b.port()]),
        "",
    ))
    .await;
    let (status, _, _) = send(p.addr("http"), post("/", "more than eight bytes")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no replay possible"
    );
    assert_eq!(b.hits(), 1);
    assert_eq!(p.stat("cluster.c.retry_or_shadow_abandoned"), 1);
    // A small body is replayed.
    let (status, _, body) = send(p.addr("http"), post("/", "small")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "small");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_breaker_overflow_is_exact_and_marked() {
    let slow = Flaky::start("slow", script(|_| (200, Duration::from_millis(1500)))).await;
    let other = Backend::start("other").await;
    let p = Proxy::start(&http_bootstrap(
        &routes(&[
            ("/other", "route: {cluster: other}"),
            ("/", "route: {cluster: c}"),
        ]),
        &format!(
            "{}    circuit_breakers: {{thresholds: [{{max_requests: 2, track_remaining: true}}]}}\n{}",
            cluster("c", &[slow.port()]),
            cluster("other", &[other.port()])
        ),
        "",
    ))
    .await;
    let addr = p.addr("http");
    let inflight: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "svc", "/").await.0 }))
        .collect();
    eventually("two requests at the backend", || slow.hits() == 2).await;
    assert_eq!(
        p.stat("cluster.c.circuit_breakers.default.rq_open"),
        1,
        "the breaker is open"
    );
    assert_eq!(p.stat("cluster.c.circuit_breakers.default.remaining_rq"), 0);
    for _ in 0..3 {
        let (status, h, _) = get(addr, "svc", "/").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h["x-envoy-overloaded"], "true");
    }
    // Other clusters are unaffected.
    let (status, _, _) = get(addr, "svc", "/other").await;
    assert_eq!(status, StatusCode::OK);
    for t in inflight {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(
        slow.hits(),
        2,
        "overflowed requests never reached the backend"
    );
    assert_eq!(p.stat("cluster.c.upstream_rq_pending_overflow"), 3);
    assert_eq!(p.stat("cluster.c.circuit_breakers.default.rq_open"), 0);
    assert_eq!(p.stat("cluster.c.circuit_breakers.default.remaining_rq"), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_breaker_queues_then_overflows_pending_requests() {
    let slow = Flaky::start("slow", script(|_| (200, Duration::from_millis(800)))).await;
    let p = Proxy::start(&http_bootstrap(
        &vhost("{cluster: c}", ""),
        &format!(
            "{}    circuit_breakers: {{thresholds: [{{max_connections: 1, max_pending_requests: 1}}]}}\n",
            cluster("c", &[slow.port()])
        ),
        "",
    ))
    .await;
    // Three streams on one HTTP/2 connection: they share a worker and its pool.
    let tx = crate::harness::h2_client(p.addr("http")).await;
    let call = |mut tx: hyper::client::conn::http2::SendRequest<Full<Bytes>>| async move {
        let req = Request::get("http://svc/")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = tx.send_request(req).await.expect("response");
        let overloaded = r.headers().contains_key("x-envoy-overloaded");
        (r.status(), overloaded)
    };
    let first = tokio::spawn(call(tx.clone()));
    eventually("the first request at the backend", || slow.hits() == 1).await;
    let second = tokio::spawn(call(tx.clone()));
    eventually("the second request pending", || {
        p.stat("cluster.c.upstream_rq_pending_total") == 1
    })
    .await;
    assert_eq!(p.stat("cluster.c.upstream_rq_pending_active"), 1);
    let (status, overloaded) = call(tx.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(overloaded);
    assert_eq!(first.await.expect("task"), (StatusCode::OK, false));
    assert_eq!(
        second.await.expect("task"),
        (StatusCode::OK, false),
        "the pending request got the connection when it was free"
    );
    assert_eq!(p.stat("cluster.c.upstream_rq_pending_overflow"), 1);
    assert!(p.stat("cluster.c.upstream_cx_overflow") >= 2);
    assert_eq!(
        p.stat("cluster.c.upstream_cx_total"),
        1,
        "one connection only"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_concurrent_retries() {
    let b = Flaky::start("b", script(|_| (503, Duration::from_millis(400)))).await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, retry_policy: {retry_on: 5xx, num_retries: 3, retry_back_off: {base_interval: 0.001s}}}",
            "",
        ),
        &format!(
            "{}    circuit_breakers: {{thresholds: [{{retry_budget: {{budget_percent: {{value: 0}}, min_retry_concurrency: 2}}}}]}}\n",
            cluster("c", &[b.port()])
        ),
        "",
    ))
    .await;
    let addr = p.addr("http");
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(addr, "svc", "/").await.0 }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::SERVICE_UNAVAILABLE);
    }
    let retries = p.stat("cluster.c.upstream_rq_retry");
    let overflow = p.stat("cluster.c.upstream_rq_retry_overflow");
    assert!(
        overflow >= 1,
        "the budget refused retries (retries {retries})"
    );
    assert!(
        retries < 30,
        "without the budget every request would retry 3 times"
    );
    assert_eq!(b.hits() as u64, 10 + retries);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_reach_the_shadow_without_changing_the_response() {
    let primary = Backend::start("primary").await;
    let shadow = Backend::start("shadow").await;
    let dead = dead_port().await;
    let p = Proxy::start(&http_bootstrap(
        &routes(&[
            ("/broken", "route: {cluster: primary, request_mirror_policies: [{cluster: dead}]}"),
            ("/", "route: {cluster: primary, request_mirror_policies: [{cluster: shadow}, {cluster: shadow, runtime_fraction: {default_value: {numerator: 0}}}]}"),
        ]),
        &format!(
            "{}{}{}",
            cluster("primary", &[primary.port()]),
            cluster("shadow", &[shadow.port()]),
            cluster("dead", &[dead])
        ),
        "",
    ))
    .await;
    let (status, _, body) = send(p.addr("http"), post("/echo", "mirrored body")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "mirrored body", "the primary answers as usual");
    let (status, _, body) = get(p.addr("http"), "svc:8080", "/info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["backend"], "primary");
    // Both requests reached the shadow once (the 0 % policy never fires).
    eventually("the shadow got both requests", || shadow.hits() == 2).await;
    assert_eq!(primary.hits(), 2);
    // A mirror to a dead cluster changes nothing for the client.
    let (status, _, body) = get(p.addr("http"), "svc", "/broken").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["backend"], "primary");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_carry_the_shadow_host() {
    let primary = Backend::start("primary").await;
    // The shadow records the Host it saw in its response body, which nobody reads; use a
    // route on the shadow side instead: a second proxy is overkill, so check via a backend
    // that stores the last Host header.
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let shadow_port = l.local_addr().expect("addr").port();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let s2 = s2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let s2 = s2.clone();
                    async move {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        *s2.lock().expect("lock") = host;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: primary, request_mirror_policies: [{cluster: shadow}]}",
            "",
        ),
        &format!(
            "{}{}",
            cluster("primary", &[primary.port()]),
            cluster("shadow", &[shadow_port])
        ),
        "",
    ))
    .await;
    let (status, _, _) = get(p.addr("http"), "api.example.com:8080", "/").await;
    assert_eq!(status, StatusCode::OK);
    eventually("the shadow saw the request", || {
        !seen.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(*seen.lock().expect("lock"), "api.example.com-shadow:8080");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_duration_ends_the_stream_with_408() {
    let slow = Flaky::start("slow", script(|_| (200, Duration::from_secs(5)))).await;
    let p = Proxy::start(&http_bootstrap(
        &vhost(
            "{cluster: c, timeout: 30s, max_stream_duration: {max_stream_duration: 0.3s}}",
            "",
        ),
        &cluster("c", &[slow.port()]),
        "",
    ))
    .await;
    let (status, _, body) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(body, "downstream duration timeout");
    assert_eq!(p.stat("http.ingress.downstream_rq_max_duration_reached"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_response_holds_its_request_slot_until_the_body_ends() {
    // A backend that sends headers at once and finishes the body only when released.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let rx = release_rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let mut rx = rx.clone();
                    async move {
                        let body =
                            http_body_util::StreamBody::new(futures::stream::once(async move {
                                let _ = rx.wait_for(|r| *r).await;
                                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(
                                    b"done",
                                )))
                            }));
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let p = Proxy::start(&http_bootstrap(
        &vhost("{cluster: c}", ""),
        &format!(
            "{}    circuit_breakers: {{thresholds: [{{max_requests: 1}}]}}\n",
            cluster("c", &[port])
        ),
        "",
    ))
    .await;
    // The first request's headers arrive; its body is still streaming.
    let s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let first = tx
        .send_request(
            Request::get("/")
                .header("host", "svc")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("headers");
    assert_eq!(first.status(), StatusCode::OK);
    let (status, h, _) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the slot is still taken"
    );
    assert_eq!(h["x-envoy-overloaded"], "true");
    release_tx.send(true).expect("release");
    let body = first.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "done");
    eventually("the slot is free again", || {
        p.stat("cluster.c.circuit_breakers.default.rq_open") == 0
    })
    .await;
    let (status, _, body) = get(p.addr("http"), "svc", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "done");
    p.stop().await;
}
