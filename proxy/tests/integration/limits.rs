//! Edge limits (issue 7): `envoy.filters.network.connection_limit`, the global downstream
//! connection limit (`ignore_global_conn_limit`), the overload manager's actions driven by an
//! injected resource pressure file, and `per_connection_buffer_limit_bytes`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const INJ: &str = "type.googleapis.com/envoy.extensions.resource_monitors.injected_resource.v3.InjectedResourceConfig";
const CX: &str = "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// A pressure file for the injected resource monitor (removed when dropped).
struct Pressure(PathBuf);

impl Pressure {
    fn new(name: &str, value: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "weir-limits-{}-{name}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&p, value).expect("write pressure");
        Pressure(p)
    }

    fn set(&self, value: &str) {
        // Write then rename: the monitor never reads a half-written file.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, value).expect("write pressure");
        std::fs::rename(&tmp, &self.0).expect("rename pressure");
    }
}

impl Drop for Pressure {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An `overload_manager` with one injected monitor `inj` and `action` on a threshold.
fn overload(file: &Pressure, actions: &[&str], threshold: f64) -> String {
    let acts: String = actions
        .iter()
        .map(|a| {
            format!(
                "  - name: {a}\n    triggers: [{{name: inj, threshold: {{value: {threshold}}}}}]\n"
            )
        })
        .collect();
    format!(
        "overload_manager:\n  refresh_interval: 0.05s\n  resource_monitors:\n  - name: inj\n    typed_config: {{'@type': {INJ}, filename: '{}'}}\n  actions:\n{acts}",
        file.0.display()
    )
}

/// Routes answering 200 "ok" locally.
fn direct_ok() -> String {
    "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                direct_response: {status: 200, body: {inline_string: ok}}\n"
        .to_string()
}

/// An HTTP/1 connection that completed one request (so the proxy admitted it), kept open.
async fn held_http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let r = tx
        .send_request(req("/"))
        .await
        .expect("first request on the held connection");
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r.into_body().collect().await;
    tx
}

fn req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("req")
}

/// Connect, send a request, read until the proxy closes (bounded): the bytes received.
/// Write errors are fine (the proxy may have closed first).
async fn request_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("connection closed by the proxy in time");
    out
}

/// A connection the proxy closes without answering.
async fn refused(addr: SocketAddr) {
    let got = request_raw(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        got.is_empty(),
        "expected a close without a response, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Poll a stat until `f` holds (bounded).
async fn stat_until(p: &Proxy, name: &str, what: &str, f: impl Fn(u64) -> bool) {
    eventually(what, || f(p.stat(name))).await;
}

async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(buf, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_the_third_client_and_releases_slots() {
    let echo = tcp_echo().await;
    let yaml = tcp_bootstrap("t", "echo", "", &cluster("echo", &[echo.port()])).replace(
        "    - filters:\n      - name: envoy.filters.network.tcp_proxy\n",
        "    - filters:\n      - name: envoy.filters.network.connection_limit\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit\n          stat_prefix: cl\n          max_connections: 2\n      - name: envoy.filters.network.tcp_proxy\n",
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("tcp");
    let mut c1 = TcpStream::connect(a).await.expect("c1");
    echo_once(&mut c1, b"one").await;
    let mut c2 = TcpStream::connect(a).await.expect("c2");
    echo_once(&mut c2, b"two").await;
    assert_eq!(p.stat("connection_limit.cl.active_connections"), 2);

    // The third concurrent client is closed (whichever worker accepted it).
    refused(a).await;
    stat_until(
        &p,
        "connection_limit.cl.limited_connections",
        "limited == 1",
        |v| v == 1,
    )
    .await;
    // The first two still work.
    echo_once(&mut c1, b"still one").await;
    echo_once(&mut c2, b"still two").await;
    assert_eq!(p.stat("connection_limit.cl.active_connections"), 2);

    drop((c1, c2));
    stat_until(
        &p,
        "connection_limit.cl.active_connections",
        "slots released",
        |v| v == 0,
    )
    .await;
    // Released slots admit new clients.
    let mut c3 = TcpStream::connect(a).await.expect("c3");
    echo_once(&mut c3, b"three").await;
    assert_eq!(p.stat("connection_limit.cl.limited_connections"), 1);
    drop(c3);
    stat_until(
        &p,
        "connection_limit.cl.active_connections",
        "back to 0",
        |v| v == 0,
    )
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connection_limit_spares_exempt_listeners_and_admin() {
    let base = http_bootstrap(&direct_ok(), "", "");
    // A second listener `exempt` (same routes) that ignores the global limit, on its own
    // address so its stats are apart.
    let start = base.find("  - name: http\n").expect("listener");
    let end = base.find("  clusters:\n").expect("clusters");
    let exempt = base[start..end]
        .replace(
            "name: http\n",
            "name: exempt\n    ignore_global_conn_limit: true\n",
        )
        .replace(
            "address: 127.0.0.1, port_value: 0",
            "address: 127.0.0.2, port_value: 0",
        );
    let yaml = format!(
        "overload_manager:\n  resource_monitors:\n  - name: envoy.resource_monitors.global_downstream_max_connections\n    typed_config: {{'@type': {CX}, max_active_downstream_connections: 1}}\n{}",
        base.replacen("  clusters:\n", &format!("{exempt}  clusters: []\n"), 1)
    );
    let p = Proxy::start(&yaml).await;
    let (a, e) = (p.addr("http"), p.addr("exempt"));
    let mut held = held_http1(a).await;

    // Over the limit: closed at accept, counted on the listener.
    refused(a).await;
    stat_until(
        &p,
        "listener.127.0.0.1_0.downstream_global_cx_overflow",
        "global overflow counted",
        |v| v >= 1,
    )
    .await;
    // The exempt listener still serves (its connections count in the total).
    let (s, _, body) = get(e, "x", "/").await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(
        p.stat("listener.127.0.0.2_0.downstream_global_cx_overflow"),
        0
    );
    // The admin listener is not limited.
    let (s, _, _) = get(p.admin(), "x", "/stats").await;
    assert_eq!(s, StatusCode::OK);
    // The held connection still works.
    let r = held.send_request(req("/")).await.expect("held works");
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    drop(held);
    // Its slot is released: new connections are admitted again.
    eventually("a free slot", || p.stat("server.total_connections") == 0).await;
    let (s, _, _) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::OK);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_connection_limit_from_the_static_runtime_layer() {
    let yaml = format!(
        "layered_runtime:\n  layers:\n  - name: static\n    static_layer:\n      envoy.resource_limits.listener.http.connection_limit: 1\n  - name: admin\n    admin_layer: {{}}\n{}",
        http_bootstrap(&direct_ok(), "", "").replace("  clusters:\n", "  clusters: []\n")
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    let held = held_http1(a).await;
    refused(a).await;
    stat_until(
        &p,
        "listener.127.0.0.1_0.downstream_cx_overflow",
        "listener overflow counted",
        |v| v == 1,
    )
    .await;
    assert_eq!(
        p.stat("listener.127.0.0.1_0.downstream_global_cx_overflow"),
        0
    );
    drop(held);
    eventually("the slot is free", || {
        p.stat("server.total_connections") == 0
    })
    .await;
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_accepting_requests_sheds_with_503_and_recovers() {
    let file = Pressure::new("rq", "0");
    let log = std::env::temp_dir().join(format!("weir-limits-{}-al.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let al = format!(
        "          access_log:\n          - name: envoy.access_loggers.file\n            typed_config: {{'@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %RESPONSE_FLAGS%\\n\"}}}}}}\n",
        log.display()
    );
    let yaml = format!(
        "{}{}",
        overload(
            &file,
            &["envoy.overload_actions.stop_accepting_requests"],
            0.95
        ),
        http_bootstrap(&direct_ok(), "", &al).replace("  clusters:\n", "  clusters: []\n")
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);

    file.set("0.99");
    let active = "overload.envoy.overload_actions.stop_accepting_requests.active";
    stat_until(&p, active, "action active", |v| v == 1).await;
    assert_eq!(p.stat("overload.inj.pressure"), 99);
    let (s, _, body) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&body[..], b"envoy overloaded");
    assert!(p.stat("http.ingress.downstream_rq_overload_close") >= 1);
    assert_eq!(
        p.stat("overload.envoy.overload_actions.stop_accepting_requests.scale_percent"),
        100
    );
    // The access log flags the local reply with OM.
    eventually("OM in the access log", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.lines().any(|l| l == "503 OM"))
    })
    .await;

    file.set("0.1");
    stat_until(&p, active, "action cleared", |v| v == 0).await;
    let (s, _, body) = get(a, "x", "/").await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
    // The /stats and /config_dump admin endpoints show the overload manager.
    let (_, _, stats) = get(p.admin(), "x", "/stats").await;
    assert!(String::from_utf8_lossy(&stats).contains("overload.inj.failed_updates: 0"));
    let (_, _, dump) = get(p.admin(), "x", "/config_dump").await;
    let dump = String::from_utf8_lossy(&dump);
    assert!(
        dump.contains("overload_manager")
            && dump.contains("envoy.overload_actions.stop_accepting_requests"),
        "{dump}"
    );
    p.stop().await;
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_http_keepalive_closes_connections() {
    let file = Pressure::new("ka", "0");
    let yaml = format!(
        "{}{}",
        overload(
            &file,
            &["envoy.overload_actions.disable_http_keepalive"],
            0.8
        ),
        http_bootstrap(&direct_ok(), "", "").replace("  clusters:\n", "  clusters: []\n")
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    let (s, h, _) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("connection").is_none(), "keep-alive by default");

    file.set("0.9");
    stat_until(
        &p,
        "overload.envoy.overload_actions.disable_http_keepalive.active",
        "action active",
        |v| v == 1,
    )
    .await;
    let (s, h, _) = get(a, "x", "/").await;
    assert_eq!(s, StatusCode::OK, "requests are still served");
    assert_eq!(
        h.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert!(p.stat("http.ingress.downstream_cx_overload_disable_keepalive") >= 1);
    // The proxy closes the connection after the response.
    let got = request_raw(a, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    file.set("0");
    stat_until(
        &p,
        "overload.envoy.overload_actions.disable_http_keepalive.active",
        "cleared",
        |v| v == 0,
    )
    .await;
    let (_, h, _) = get(a, "x", "/").await;
    assert!(h.get("connection").is_none());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_stop_accepting_connections() {
    let file = Pressure::new("cx", "0");
    let yaml = format!(
        "{}{}",
        overload(
            &file,
            &["envoy.overload_actions.reject_incoming_connections"],
            0.9
        ),
        http_bootstrap(&direct_ok(), "", "").replace("  clusters:\n", "  clusters: []\n")
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);
    file.set("0.95");
    stat_until(
        &p,
        "overload.envoy.overload_actions.reject_incoming_connections.active",
        "active",
        |v| v == 1,
    )
    .await;
    refused(a).await;
    stat_until(
        &p,
        "listener.127.0.0.1_0.downstream_cx_overload_reject",
        "reject counted",
        |v| v >= 1,
    )
    .await;
    // The admin listener is not affected.
    assert_eq!(get(p.admin(), "x", "/ready").await.0, StatusCode::OK);
    file.set("0");
    stat_until(
        &p,
        "overload.envoy.overload_actions.reject_incoming_connections.active",
        "cleared",
        |v| v == 0,
    )
    .await;
    assert_eq!(get(a, "x", "/").await.0, StatusCode::OK);
    p.stop().await;

    // stop_accepting_connections: a connection waits (not accepted) until the action clears.
    let file = Pressure::new("acc", "0.95");
    let yaml = format!(
        "{}{}",
        overload(
            &file,
            &["envoy.overload_actions.stop_accepting_connections"],
            0.9
        ),
        http_bootstrap(&direct_ok(), "", "").replace("  clusters:\n", "  clusters: []\n")
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    let active = "overload.envoy.overload_actions.stop_accepting_connections.active";
    stat_until(&p, active, "active", |v| v == 1).await;
    let total = p.stat("listener.127.0.0.1_0.downstream_cx_total");
    let mut s = TcpStream::connect(a).await.expect("queued in the backlog");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf))
            .await
            .is_err(),
        "not served while accepting is stopped"
    );
    assert_eq!(p.stat("listener.127.0.0.1_0.downstream_cx_total"), total);
    file.set("0");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("served once accepting resumes")
        .expect("read");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_connection_buffer_limit_bounds_request_heads() {
    let yaml = http_bootstrap(&direct_ok(), "", "")
        .replace("  clusters:\n", "  clusters: []\n")
        .replacen(
            "  - name: http\n",
            "  - name: http\n    per_connection_buffer_limit_bytes: 16384\n",
            1,
        );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    // Normal requests pass.
    let (s, _, body) = get(a, "x", "/").await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
    // A 12 KiB header fits (under the 60 KiB max_request_headers_kb and the 16 KiB buffer).
    let mid = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(12 * 1024)
    );
    let got = request_raw(a, mid.as_bytes()).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // 24 KiB of headers: under max_request_headers_kb (60) but over the buffer limit: 431.
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(24 * 1024)
    );
    let got = request_raw(a, big.as_bytes()).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    p.stop().await;
}
