//! Dynamic listeners through `state.listener_manager` (what LDS drives): in-place
//! replacement with requests in flight and under load, address change, removal, the drain
//! time running out, bind failures and brand-new listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use weir_proxy::cli::Options;
use weir_proxy::config::{Errors, TranslateCtx};
use weir_proxy::listener::{ListenerChange, ListenerConfig, ListenerError, translate_listener};
use weir_xds_api::pb::envoy::config::listener::v3::Listener;

use crate::harness::*;

/// A proxy from `yaml` with `drain_time_s` (the harness uses 5 s).
async fn start(yaml: &str, drain_time_s: u64) -> Proxy {
    let opts = Options {
        config_yaml: Some(yaml.to_string()),
        concurrency: Some(2),
        drain_time_s,
        ..Options::default()
    };
    let snap = weir_proxy::config::load(&opts).expect("valid test config");
    let handle = weir_proxy::server::start(opts, snap)
        .await
        .expect("server starts");
    Proxy { handle }
}

/// Translate a `Listener` (YAML) against the proxy's clusters, as LDS would.
fn translate(p: &Proxy, yaml: &str) -> Arc<ListenerConfig> {
    let l: Listener = weir_xds_api::from_yaml(yaml).expect("listener yaml");
    let names: Vec<String> = p
        .handle
        .state
        .snapshot
        .load()
        .clusters
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let clusters = names.iter().map(String::as_str).collect();
    let ctx = TranslateCtx {
        clusters: &clusters,
        stats: &p.handle.state.stats,
        rds: None,
        rds_table: false,
    };
    let mut errs = Errors::default();
    let cfg = translate_listener(&l, "listener", &ctx, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    Arc::new(cfg.expect("listener translates"))
}

/// An HTTP listener `name` on 127.0.0.1:`port` sending everything to `cluster`.
fn http_listener(name: &str, port: u16, cluster: &str, stat_prefix: &str) -> String {
    format!(
        r#"
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {stat_prefix}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
      route_config:
        name: local
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{prefix: /}}
            route: {{cluster: {cluster}, timeout: 15s}}
"#
    )
}

/// Backends `old` and `new`; a proxy whose listener `http` (port 0) routes to `old`.
async fn two_backends(drain_time_s: u64) -> (Proxy, Backend, Backend) {
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    let clusters = format!(
        "{}{}",
        cluster("old", &[old.port()]),
        cluster("new", &[new.port()])
    );
    let p = start(
        &http_bootstrap(&all_to("old", "15s"), &clusters, ""),
        drain_time_s,
    )
    .await;
    (p, old, new)
}

/// A keep-alive HTTP/1.1 client connection.
async fn h1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tx
}

fn req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("req")
}

/// One request on a fresh connection; the backend that answered, or why it failed.
async fn try_get(addr: SocketAddr) -> Result<String, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = tx
        .send_request(req("/"))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!("status {status}"));
    }
    Ok(backend)
}

async fn backend_of(addr: SocketAddr) -> String {
    let (status, headers, _) = get(addr, "x", "/").await;
    assert_eq!(status, StatusCode::OK);
    headers
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Connecting to `addr` is refused (bounded wait).
async fn refused(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} still accepts connections");
}

async fn no_version_draining(p: &Proxy) {
    let m = &p.handle.state.listener_manager;
    eventually("old listener versions drained", || m.draining() == 0).await;
    assert_eq!(p.stat("listener_manager.total_listeners_draining"), 0);
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test]
async fn in_place_update_lets_the_slow_request_finish_and_closes_its_connection() {
    let (p, old, _new) = two_backends(5).await;
    let addr = p.addr("http");
    assert_eq!(p.stat("listener_manager.listener_added"), 1);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 1);

    // A slow request in flight on a keep-alive connection of the first version.
    let mut c = h1(addr).await;
    let slow = tokio::spawn(c.send_request(req("/slow/3000")));
    eventually("slow request reached the old backend", || old.hits() == 1).await;

    let cfg = translate(&p, &http_listener("http", 0, "new", "ingress2"));
    let change = p.handle.state.listener_manager.add_or_update(cfg);
    assert_eq!(
        change.expect("update"),
        ListenerChange::Modified { in_place: true }
    );
    assert_eq!(p.addr("http"), addr, "sockets kept");

    // New connections see the new routes at once.
    assert_eq!(backend_of(addr).await, "new");

    // The in-flight request completes with the old route's answer, and its connection is
    // closed after it.
    let resp = slow.await.expect("task").expect("slow response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-backend"], "old");
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    resp.into_body().collect().await.expect("body");
    let next = tokio::time::timeout(Duration::from_secs(5), async {
        match c.ready().await {
            Ok(()) => c.send_request(req("/")).await.map(|_| ()),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("bounded");
    assert!(next.is_err(), "the drained connection takes no new request");

    no_version_draining(&p).await;
    assert_eq!(p.stat("listener_manager.listener_modified"), 1);
    assert_eq!(p.stat("listener_manager.listener_in_place_updated"), 1);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 1);
    assert_eq!(p.stat("http.ingress.downstream_cx_drain_close"), 1);
    assert_eq!(
        p.stat("server.live"),
        1,
        "only the listener version drained"
    );
    p.stop().await;
}

#[tokio::test]
async fn in_place_updates_under_a_request_loop_fail_nothing() {
    let (p, _old, _new) = two_backends(5).await;
    let addr = p.addr("http");
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let done = done.clone();
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..150 {
                match try_get(addr).await {
                    Ok(b) => {
                        seen.insert(b);
                    }
                    Err(e) => failures.push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            (failures, seen)
        }));
    }
    // Four replacements spread over the loop, alternating the route.
    for (i, at) in [40usize, 100, 160, 220].into_iter().enumerate() {
        let d = done.clone();
        eventually("requests progress", || d.load(Ordering::SeqCst) >= at).await;
        let to = if i % 2 == 0 { "new" } else { "old" };
        let cfg = translate(&p, &http_listener("http", 0, to, "ingress"));
        let change = p.handle.state.listener_manager.add_or_update(cfg);
        assert_eq!(
            change.expect("update"),
            ListenerChange::Modified { in_place: true }
        );
    }
    let mut seen = std::collections::HashSet::new();
    for c in clients {
        let (failures, s) = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("loop finishes")
            .expect("client");
        assert!(failures.is_empty(), "failed requests: {failures:?}");
        seen.extend(s);
    }
    assert!(seen.contains("old") && seen.contains("new"), "{seen:?}");
    assert_eq!(done.load(Ordering::SeqCst), 300);
    no_version_draining(&p).await;
    assert_eq!(p.stat("listener_manager.listener_in_place_updated"), 4);
    assert_eq!(p.stat("http.ingress.downstream_rq_2xx"), 300);
    p.stop().await;
}

#[tokio::test]
async fn address_change_moves_the_listener() {
    let (p, _old, _new) = two_backends(5).await;
    let before = p.addr("http");
    let port = free_port();
    let cfg = translate(&p, &http_listener("http", port, "new", "ingress"));
    let change = p.handle.state.listener_manager.add_or_update(cfg);
    assert_eq!(
        change.expect("update"),
        ListenerChange::Modified { in_place: false }
    );
    let after = p.addr("http");
    assert_eq!(after.port(), port);
    assert_eq!(backend_of(after).await, "new");
    refused(before).await;
    no_version_draining(&p).await;
    assert_eq!(p.stat("listener_manager.listener_modified"), 1);
    assert_eq!(p.stat("listener_manager.listener_in_place_updated"), 0);
    // Two socket sets (start, address change), one socket per worker each.
    assert_eq!(p.stat("listener_manager.listener_create_success"), 4);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 1);
    p.stop().await;
}

#[tokio::test]
async fn remove_stops_accepting_and_lets_in_flight_finish() {
    let (p, old, _new) = two_backends(5).await;
    let addr = p.addr("http");
    let mut c = h1(addr).await;
    let slow = tokio::spawn(c.send_request(req("/slow/1000")));
    eventually("slow request in flight", || old.hits() == 1).await;

    let m = &p.handle.state.listener_manager;
    assert!(m.remove("http"));
    assert!(!m.remove("http"), "already gone");
    assert!(p.handle.listener_addr("http").is_none());
    refused(addr).await;

    let resp = slow
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-backend"], "old");
    resp.into_body().collect().await.expect("body");

    no_version_draining(&p).await;
    assert_eq!(p.stat("listener_manager.listener_removed"), 1);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 0);
    let (status, _, body) = get(p.admin(), "x", "/listeners").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty(), "{body:?}");
    p.stop().await;
}

#[tokio::test]
async fn drain_time_over_closes_what_is_left_of_the_old_version() {
    let echo = tcp_echo().await;
    let p = start(
        &tcp_bootstrap("t", "echo", "", &cluster("echo", &[echo.port()])),
        1,
    )
    .await;
    let addr = p.addr("tcp");

    let mut c = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 4];
    c.write_all(b"ping").await.expect("write");
    c.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");

    // In place (same address, port 0): the tcp_proxy connection of the old version keeps
    // working while it drains...
    let yaml = r#"
name: tcp
address: {socket_address: {address: 127.0.0.1, port_value: 0}}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: t2
      cluster: echo
"#;
    let change = p
        .handle
        .state
        .listener_manager
        .add_or_update(translate(&p, yaml));
    assert_eq!(
        change.expect("update"),
        ListenerChange::Modified { in_place: true }
    );
    c.write_all(b"pong").await.expect("write");
    c.read_exact(&mut buf).await.expect("echo while draining");
    assert_eq!(&buf, b"pong");

    // ...and is closed by the proxy once the drain time (1 s) is over.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .expect("closed after the drain time");
    assert!(r.is_err() || rest.is_empty());

    // New connections get the new version.
    let mut n = TcpStream::connect(addr).await.expect("connect");
    n.write_all(b"new!").await.expect("write");
    n.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"new!");
    assert_eq!(p.stat("tcp.t2.downstream_cx_total"), 1);
    assert_eq!(p.stat("tcp.t.downstream_cx_total"), 1);
    drop(n);
    no_version_draining(&p).await;
    assert_eq!(p.stat("server.live"), 1);
    p.stop().await;
}

#[tokio::test]
async fn drain_time_over_resets_a_long_h2_stream_of_the_old_version() {
    let (p, old, _new) = two_backends(1).await;
    let addr = p.addr("http");
    let mut h2 = h2_client(addr).await;
    let long = tokio::spawn(h2.send_request(req("/slow/8000")));
    eventually("long stream reached the backend", || old.hits() == 1).await;
    let cfg = translate(&p, &http_listener("http", 0, "new", "ingress"));
    p.handle
        .state
        .listener_manager
        .add_or_update(cfg)
        .expect("update");
    // GOAWAY lets the stream run, the drain time (1 s) ends it well before the backend would.
    let r = tokio::time::timeout(Duration::from_secs(6), long)
        .await
        .expect("ended by the drain time")
        .expect("task");
    assert!(r.is_err(), "the stream was cut: {r:?}");
    // The new version serves HTTP/2 too.
    let mut h2 = h2_client(addr).await;
    let resp = h2.send_request(req("/")).await.expect("response");
    assert_eq!(resp.headers()["x-backend"], "new");
    no_version_draining(&p).await;
    p.stop().await;
}

#[tokio::test]
async fn bind_failure_leaves_the_old_version_serving() {
    let (p, _old, _new) = two_backends(5).await;
    let addr = p.addr("http");
    // A foreign socket (no SO_REUSEPORT) holds the port.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("addr").port();
    let cfg = translate(&p, &http_listener("http", port, "new", "ingress"));
    match p.handle.state.listener_manager.add_or_update(cfg) {
        Err(ListenerError::Bind { name, source }) => {
            assert_eq!(name, "http");
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
    assert_eq!(p.addr("http"), addr);
    assert_eq!(backend_of(addr).await, "old");
    assert_eq!(p.stat("listener_manager.listener_create_failure"), 1);
    assert_eq!(p.stat("listener_manager.listener_modified"), 0);
    assert_eq!(p.handle.state.listener_manager.draining(), 0);
    drop(held);
    p.stop().await;
}

#[tokio::test]
async fn a_new_listener_at_runtime() {
    let (p, _old, _new) = two_backends(5).await;
    let m = &p.handle.state.listener_manager;
    let cfg = translate(&p, &http_listener("extra", 0, "new", "extra"));
    assert_eq!(m.add_or_update(cfg).expect("add"), ListenerChange::Added);
    let extra = p.addr("extra");
    assert_ne!(extra, p.addr("http"));
    assert_eq!(backend_of(extra).await, "new");
    assert_eq!(backend_of(p.addr("http")).await, "old");
    assert_eq!(p.stat("listener_manager.listener_added"), 2);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 2);
    assert_eq!(p.stat("http.extra.downstream_rq_2xx"), 1);

    let (_, _, body) = get(p.admin(), "x", "/listeners").await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("http::{}\nextra::{extra}\n", p.addr("http"))
    );
    // Another name on the same fixed address is refused.
    let dup = translate(&p, &http_listener("dup", extra.port(), "new", "dup"));
    assert!(matches!(
        m.add_or_update(dup),
        Err(ListenerError::Bind { .. })
    ));
    // Server drain: no more changes.
    p.handle.state.drain_listeners();
    let late = translate(&p, &http_listener("late", 0, "new", "late"));
    assert!(matches!(m.add_or_update(late), Err(ListenerError::Stopped)));
    p.stop().await;
}

/// A draining listener keeps its idle HTTP/1 keep-alive connections usable for the HCM's
/// `drain_timeout` (default 5 s): the next request is served with `Connection: close`
/// instead of racing an immediate close; a connection left idle is closed when the
/// drain_timeout ends.
#[tokio::test]
async fn drain_serves_idle_http1_connections_once_more_with_connection_close() {
    let (p, old, _new) = two_backends(30).await;
    let addr = p.addr("http");
    let mut reused = h1(addr).await;
    let mut idle = h1(addr).await;
    for c in [&mut reused, &mut idle] {
        let r = c.send_request(req("/")).await.expect("first request");
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get("connection").is_none());
        r.into_body().collect().await.expect("body");
    }
    assert_eq!(old.hits(), 2);

    let cfg = translate(&p, &http_listener("http", 0, "new", "ingress2"));
    p.handle
        .state
        .listener_manager
        .add_or_update(cfg)
        .expect("update");
    eventually("drain started", || {
        p.stat("http.ingress.downstream_cx_drain_close") == 2
    })
    .await;

    // The idle connection of the drained version still takes a request (the old routes),
    // answered with `Connection: close`, and is closed after it.
    reused.ready().await.expect("still open");
    let r = reused
        .send_request(req("/"))
        .await
        .expect("served while draining");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-backend"], "old");
    assert_eq!(
        r.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    r.into_body().collect().await.expect("body");
    let next = tokio::time::timeout(Duration::from_secs(5), async {
        match reused.ready().await {
            Ok(()) => reused.send_request(req("/")).await.map(|_| ()),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("bounded");
    assert!(next.is_err(), "closed after the Connection: close response");

    // The connection nobody used again is closed when the drain_timeout ends.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        while !idle.is_closed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an idle connection is closed after drain_timeout"
    );
    p.stop().await;
}
