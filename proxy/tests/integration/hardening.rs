//! Local replies with Envoy's codes, request smuggling shapes, limits and timeouts.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// A backend that reads a request head and closes without answering.
async fn rude_backend() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                drop(s);
            });
        }
    });
    port
}

async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_reply_codes() {
    let slow = Backend::start("slow").await;
    let rude = rude_backend().await;
    let dead = dead_port().await;
    let vhosts = "            - name: all\n              domains: [\"*\"]\n              routes:\n\
         \x20             - match: {prefix: /slow}\n                route: {cluster: slow, timeout: 0.2s}\n\
         \x20             - match: {prefix: /rude}\n                route: {cluster: rude}\n\
         \x20             - match: {prefix: /dead}\n                route: {cluster: dead}\n\
         \x20             - match: {prefix: /nohost}\n                route: {cluster: nohost}\n";
    let nohost = "  - name: nohost\n    connect_timeout: 1s\n    type: STRICT_DNS\n    load_assignment:\n      cluster_name: nohost\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {address: {socket_address: {address: does-not-exist.invalid, port_value: 80}}}\n";
    let clusters = format!(
        "{}{}{}{nohost}",
        cluster("slow", &[slow.port()]),
        cluster("rude", &[rude]),
        cluster("dead", &[dead])
    );
    let p = Proxy::start(&http_bootstrap(vhosts, &clusters, "")).await;
    let addr = p.addr("http");

    let (s, h, body) = get(addr, "x", "/slow/5000").await;
    assert_eq!(s.as_u16(), 504);
    assert_eq!(&body[..], b"upstream request timeout");
    assert_eq!(h["content-type"], "text/plain");
    assert_eq!(p.stat("cluster.slow.upstream_rq_timeout"), 1);

    let (s, _, body) = get(addr, "x", "/rude").await;
    assert_eq!(s.as_u16(), 503);
    assert!(
        String::from_utf8_lossy(&body).contains("reset before headers"),
        "{body:?}"
    );

    let (s, _, body) = get(addr, "x", "/dead").await;
    assert_eq!(s.as_u16(), 503);
    assert!(
        String::from_utf8_lossy(&body).contains("connection failure"),
        "{body:?}"
    );
    assert!(p.stat("cluster.dead.upstream_cx_connect_fail") >= 1);

    let (s, _, body) = get(addr, "x", "/nohost").await;
    assert_eq!(s.as_u16(), 503);
    assert_eq!(&body[..], b"no healthy upstream");

    let (s, _, _) = get(addr, "x", "/unrouted").await;
    assert_eq!(s.as_u16(), 404);
    assert_eq!(p.stat("http.ingress.downstream_rq_5xx"), 4);
    assert_eq!(p.stat("http.ingress.downstream_rq_4xx"), 1);
    // Failed attempts release their gauges too.
    for c in ["slow", "rude", "dead"] {
        eventually("rq_active back to 0", || {
            p.stat(&format!("cluster.{c}.upstream_rq_active")) == 0
        })
        .await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits() {
    let (p, b) = proxy_to_backend("").await;
    let addr = p.addr("http");
    let big = "a".repeat(61 * 1024);
    let resp = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let resp = raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    // HTTP/2: more headers than allowed -> 431 on that stream, connection stays usable.
    let mut h2 = h2_client(addr).await;
    let mut req = Request::get("http://x/")
        .body(Full::<Bytes>::default())
        .expect("req");
    for i in 0..120 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).expect("n"),
            "v".parse().expect("v"),
        );
    }
    match h2.send_request(req).await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(
            e.to_string().contains("reset") || e.to_string().contains("stream"),
            "{e}"
        ),
    }
    let ok = h2
        .send_request(
            Request::get("http://x/")
                .body(Full::default())
                .expect("req"),
        )
        .await
        .expect("still usable");
    assert_eq!(ok.status(), 200);
    assert_eq!(b.hits(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shapes_get_400_and_close() {
    let (p, b) = proxy_to_backend("").await;
    let addr = p.addr("http");
    let shapes: &[&str] = &[
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5,5\r\n\r\nhello",
        // Content-Length with Transfer-Encoding, in either order (Envoy's default: 400).
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Bad : a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\0b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-Cr: a\rb\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "GARBAGE\r\n\r\n",
    ];
    let mut failures = Vec::new();
    for shape in shapes {
        let resp = raw(addr, shape.as_bytes(), Duration::from_secs(5)).await;
        // Exactly one 400, then the connection is closed.
        if !resp.starts_with("HTTP/1.1 400") || resp.matches("HTTP/1.1").count() != 1 {
            failures.push(format!("{shape:?} -> {:?}", &resp[..resp.len().min(60)]));
        }
    }
    assert!(
        failures.is_empty(),
        "accepted shapes:\n{}",
        failures.join("\n")
    );
    assert_eq!(b.hits(), 0, "nothing was forwarded");
    let resp = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        resp.contains("content-length with transfer-encoding"),
        "{resp}"
    );
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );

    // After an upgrade that is refused (no WebSocket on this route) the connection stays
    // HTTP/1 but the observer has stopped: Transfer-Encoding is then not trusted either.
    let resp = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(!resp.contains("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("unobserved transfer-encoding"), "{resp}");
    assert_eq!(b.hits(), 0, "nothing was forwarded");

    // A chunk size that overflows is found while the body streams: 400 and close (the head
    // may already have reached the upstream, whose request is then aborted).
    let resp = raw(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1").count(), 1);

    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_stay_separate() {
    let (p, b) = proxy_to_backend("").await;
    let two = "GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let resp = raw(p.addr("http"), two.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    let first = resp.find("/first").expect("first");
    let second = resp.find("/second").expect("second");
    assert!(first < second);
    assert_eq!(b.hits(), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_is_armed() {
    let (p, b) = proxy_to_backend("          request_headers_timeout: 0.3s\n").await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection must be closed by the header timer");
    assert_eq!(b.hits(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscores_rejected_when_configured() {
    let (p, b) = proxy_to_backend("          common_http_protocol_options: {headers_with_underscores_action: REJECT_REQUEST}\n").await;
    let req = Request::get("/")
        .header("host", "x")
        .header("x_under", "1")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let (s, _, _) = send(p.addr("http"), req).await;
    assert_eq!(s.as_u16(), 400);
    assert_eq!(b.hits(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalization_feeds_routing_and_upstream() {
    let b = Backend::start("b").await;
    let vhosts = "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /admin}\n                direct_response: {status: 403}\n              - match: {prefix: /}\n                route: {cluster: b}\n";
    let extra = "          normalize_path: true\n          merge_slashes: true\n          path_with_escaped_slashes_action: REJECT_REQUEST\n";
    let p = Proxy::start(&http_bootstrap(vhosts, &cluster("b", &[b.port()]), extra)).await;
    let addr = p.addr("http");
    let resp = raw(
        addr,
        b"GET /public/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let resp = raw(
        addr,
        b"GET //a/./b//c?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.contains("\"path\":\"/a/b/c?q=1\""), "{resp}");
    let resp = raw(
        addr,
        b"GET /a%2Fb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failure_mid_body_is_visible_downstream() {
    let (p, _b) = proxy_to_backend("").await;
    // HTTP/1.1: headers arrive, then the connection is cut before the promised length.
    let s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::get("/abort")
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("headers");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(
        body.is_err(),
        "incomplete body must be an error, not a clean end"
    );
    // HTTP/2: the stream is reset.
    let mut h2 = h2_client(p.addr("http")).await;
    let resp = h2
        .send_request(
            Request::get("http://x/abort")
                .body(Full::default())
                .expect("req"),
        )
        .await
        .expect("headers");
    assert!(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .is_err()
    );
    eventually("tx resets counted", || {
        p.stat("http.ingress.downstream_rq_tx_reset") == 2
    })
    .await;
    eventually("upstream rx resets counted", || {
        p.stat("cluster.b.upstream_rq_rx_reset") == 2
    })
    .await;
    eventually("gauges at baseline", || {
        p.stat("http.ingress.downstream_rq_active") == 0
            && p.stat("cluster.b.upstream_rq_active") == 0
    })
    .await;
    p.stop().await;
}
