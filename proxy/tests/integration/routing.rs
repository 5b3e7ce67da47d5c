//! Routing: every match kind, weighted split, rewrites, redirects, direct responses, header
//! mutations, forwarding headers.

use std::collections::HashMap;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::harness::*;

async fn setup() -> (Proxy, Backend, Backend, Backend) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let vhosts = r#"
            - name: api
              domains: ["api.example.com", "api.example.com:*"]
              request_headers_to_add:
              - header: {key: x-vhost, value: api}
              routes:
              - match: {path: /exact}
                route: {cluster: a}
              - match: {safe_regex: {regex: "/re/[0-9]+"}}
                route: {cluster: b}
              - match:
                  prefix: /hdr
                  headers:
                  - name: x-canary
                    string_match: {exact: "true"}
                route: {cluster: c}
              - match:
                  prefix: /q
                  query_parameters:
                  - name: v
                    string_match: {exact: "2"}
                route: {cluster: c}
              - match: {prefix: /grpc, grpc: {}}
                route: {cluster: c}
              - match: {prefix: /CaSe, case_sensitive: false}
                route: {cluster: c}
              - match: {prefix: /old/}
                route: {cluster: a, prefix_rewrite: /new/}
              - match: {prefix: /rx/}
                route:
                  cluster: a
                  regex_rewrite: {pattern: {regex: "^/rx/(\\w+)/(\\w+)$"}, substitution: "/\\2/\\1"}
              - match: {prefix: /hostlit}
                route: {cluster: a, host_rewrite_literal: rewritten.internal}
              - match: {prefix: /redirect}
                redirect: {https_redirect: true, host_redirect: secure.example.com, path_redirect: /landing, response_code: FOUND}
              - match: {prefix: /direct}
                direct_response: {status: 418, body: {inline_string: "short and stout"}}
              - match: {prefix: /split}
                route:
                  weighted_clusters:
                    clusters:
                    - {name: a, weight: 80}
                    - {name: b, weight: 20}
              - match: {prefix: /by-header}
                route: {cluster_header: x-cluster}
              - match: {prefix: /hdrs}
                route: {cluster: a}
                request_headers_to_add:
                - header: {key: x-route, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
                request_headers_to_remove: [x-secret]
                response_headers_to_add:
                - header: {key: x-resp, value: added}
                response_headers_to_remove: [x-backend]
              - match: {prefix: /}
                route: {cluster: a}
            - name: other
              domains: ["*.wild.example.com"]
              routes:
              - match: {prefix: /}
                route: {cluster: b}
            - name: fallback
              domains: ["*"]
              routes:
              - match: {prefix: /only}
                route: {cluster: c}
"#;
    let clusters = format!(
        "{}{}{}",
        cluster("a", &[a.port()]),
        cluster("b", &[b.port()]),
        cluster("c", &[c.port()])
    );
    let p = Proxy::start(&http_bootstrap(vhosts, &clusters, "")).await;
    (p, a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_kinds_pick_the_right_backend() {
    let (p, _a, _b, _c) = setup().await;
    let addr = p.addr("http");
    let backend = |body: &Bytes| {
        json(body)["backend"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let api = "api.example.com";
    let (s, _, body) = get(addr, api, "/exact").await;
    assert_eq!((s.as_u16(), backend(&body).as_str()), (200, "a"));
    let (_, _, body) = get(addr, api, "/exact/more").await;
    assert_eq!(
        backend(&body),
        "a",
        "path match is exact; falls to catch-all a"
    );
    let (_, _, body) = get(addr, api, "/re/123").await;
    assert_eq!(backend(&body), "b");
    let (_, _, body) = get(addr, api, "/re/12x").await;
    assert_eq!(backend(&body), "a", "regex is a full match");
    let req = Request::get("/hdr")
        .header("host", api)
        .header("x-canary", "true")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (_, _, body) = send(addr, req).await;
    assert_eq!(backend(&body), "c");
    let (_, _, body) = get(addr, api, "/hdr").await;
    assert_eq!(backend(&body), "a");
    let (_, _, body) = get(addr, api, "/q?x=1&v=2").await;
    assert_eq!(backend(&body), "c");
    let (_, _, body) = get(addr, api, "/q?v=3").await;
    assert_eq!(backend(&body), "a");
    let req = Request::post("/grpc.Svc/M")
        .header("host", api)
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (_, _, body) = send(addr, req).await;
    assert_eq!(backend(&body), "c");
    let (_, _, body) = get(addr, api, "/grpc.Svc/M").await;
    assert_eq!(backend(&body), "a", "grpc match needs a grpc content-type");
    let (_, _, body) = get(addr, api, "/case/x").await;
    assert_eq!(backend(&body), "c");
    // Domains: port-qualified, wildcard suffix, catch-all.
    let (_, _, body) = get(addr, "api.example.com:8080", "/exact").await;
    assert_eq!(backend(&body), "a");
    let (_, _, body) = get(addr, "x.wild.example.com", "/").await;
    assert_eq!(backend(&body), "b");
    let (_, _, body) = get(addr, "unknown.test", "/only").await;
    assert_eq!(backend(&body), "c");
    let (s, _, _) = get(addr, "unknown.test", "/nothing").await;
    assert_eq!(s.as_u16(), 404);
    assert_eq!(p.stat("http.ingress.no_route"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_redirects_direct_responses() {
    let (p, _a, _b, _c) = setup().await;
    let addr = p.addr("http");
    let api = "api.example.com";
    let (_, _, body) = get(addr, api, "/old/thing?x=1").await;
    let j = json(&body);
    assert_eq!(j["path"], "/new/thing?x=1");
    assert_eq!(j["headers"]["x-envoy-original-path"], "/old/thing?x=1");
    let (_, _, body) = get(addr, api, "/rx/one/two").await;
    assert_eq!(json(&body)["path"], "/two/one");
    let (_, _, body) = get(addr, api, "/hostlit").await;
    assert_eq!(json(&body)["headers"]["host"], "rewritten.internal");
    let (s, h, _) = get(addr, api, "/redirect/x").await;
    assert_eq!(s.as_u16(), 302);
    assert_eq!(h["location"], "https://secure.example.com/landing");
    let (s, h, body) = get(addr, api, "/direct").await;
    assert_eq!(s.as_u16(), 418);
    assert_eq!(&body[..], b"short and stout");
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(p.stat("http.ingress.rq_redirect"), 1);
    assert_eq!(p.stat("http.ingress.rq_direct_response"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_and_cluster_header() {
    let (p, _a, _b, _c) = setup().await;
    let addr = p.addr("http");
    let mut counts: HashMap<String, usize> = HashMap::new();
    let n = 400;
    for _ in 0..n {
        let (_, _, body) = get(addr, "api.example.com", "/split").await;
        *counts
            .entry(
                json(&body)["backend"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_default() += 1;
    }
    let a = counts.get("a").copied().unwrap_or(0) as f64 / n as f64;
    // 80/20 split; with n=400 the standard deviation is 2%, so +-8% is a 4-sigma bound.
    assert!((0.72..=0.88).contains(&a), "a got {a}: {counts:?}");
    assert_eq!(
        counts.get("a").unwrap_or(&0) + counts.get("b").unwrap_or(&0),
        n
    );
    let req = Request::get("/by-header")
        .header("host", "api.example.com")
        .header("x-cluster", "c")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (_, _, body) = send(addr, req).await;
    assert_eq!(json(&body)["backend"], "c");
    let (s, _, _) = get(addr, "api.example.com", "/by-header").await;
    assert_eq!(s.as_u16(), 503, "missing cluster header");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_mutations_and_forwarding_headers() {
    let (p, _a, _b, _c) = setup().await;
    let addr = p.addr("http");
    let req = Request::get("/hdrs")
        .header("host", "api.example.com")
        .header("x-secret", "s")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("x-request-id", "given-id")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, h, body) = send(addr, req).await;
    assert_eq!(s.as_u16(), 200);
    let j = json(&body);
    let hdrs = &j["headers"];
    assert_eq!(hdrs["x-route"], "127.0.0.1");
    assert_eq!(hdrs["x-vhost"], "api");
    assert!(hdrs.get("x-secret").is_none());
    assert!(
        hdrs.get("x-hop").is_none(),
        "connection-nominated header removed"
    );
    assert_eq!(hdrs["x-forwarded-proto"], "http");
    assert_eq!(
        hdrs["x-request-id"], "given-id",
        "internal request keeps its id"
    );
    assert_eq!(hdrs["x-envoy-expected-rq-timeout-ms"], "15000");
    assert_eq!(h["x-resp"], "added");
    assert!(h.get("x-backend").is_none());
    assert_eq!(h["server"], "weir");
    assert!(
        h["x-envoy-upstream-service-time"]
            .to_str()
            .expect("ascii")
            .parse::<u64>()
            .is_ok()
    );
    // Request id generated when absent.
    let (_, _, body) = get(addr, "api.example.com", "/").await;
    let id = json(&body)["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(id.len(), 36, "uuid: {id}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_mode_appends_xff_and_strips_internal_headers() {
    let a = Backend::start("a").await;
    let vhosts = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                route: {cluster: a}\n";
    let extra = "          use_remote_address: true\n          xff_num_trusted_hops: 0\n";
    let p = Proxy::start(&http_bootstrap(vhosts, &cluster("a", &[a.port()]), extra)).await;
    let req = Request::get("/")
        .header("host", "x")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-envoy-hedge-on-per-try-timeout", "true")
        .header("x-request-id", "client-chosen")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (_, _, body) = send(p.addr("http"), req).await;
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert!(
        h.get("x-envoy-hedge-on-per-try-timeout").is_none(),
        "external request: x-envoy-* stripped"
    );
    assert_ne!(
        h["x-request-id"], "client-chosen",
        "external request id regenerated at the edge"
    );
    let req = Request::get("/")
        .header("host", "x")
        .header("x-envoy-hedge-on-per-try-timeout", "true")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (_, _, body) = send(p.addr("http"), req).await;
    let h = &json(&body)["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-envoy-internal"], "true");
    assert_eq!(
        h["x-envoy-hedge-on-per-try-timeout"], "true",
        "internal peer keeps control headers"
    );
    p.stop().await;
}
