//! Transparent interception and edge listener filters end to end: `http_inspector` +
//! `tls_inspector` on one port (HTTP/1.1, h2c, TLS, opaque TCP), server-speaks-first
//! protocols and `listener_filters_timeout`, the PROXY protocol (v1/v2 from a raw client:
//! XFF, access log, RBAC `remote_ip`; malformed headers), the `use_original_dst` hand-off to
//! `bind_to_port: false` listeners and ORIGINAL_DST clusters (the destination comes from a
//! PROXY header, which restores the local address as `original_dst` does behind NAT; NAT
//! itself is tested in network namespaces by sidecar.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const PP: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol";

/// A `filters:` list with one tcp_proxy (6-space indent for the list items).
fn tcp_filters(stat_prefix: &str, cluster: &str) -> String {
    format!(
        "      filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {{'@type': {TCP_PROXY}, stat_prefix: {stat_prefix}, cluster: {cluster}}}\n"
    )
}

/// A `filters:` list with one HTTP connection manager routing everything to `cluster`.
fn hcm_filters(cluster: &str, extra: &str) -> String {
    format!(
        r#"      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: in
{extra}          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: {cluster}, timeout: 5s}}
"#
    )
}

fn bootstrap(listeners: &str, clusters: &str) -> String {
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n\
         static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}"
    )
}

/// Read until the peer closes or `wait` passes.
async fn read_for(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Read exactly `n` bytes (bounded).
async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    buf
}

/// The first flight of a real TLS client (a ClientHello with SNI).
fn client_hello() -> Vec<u8> {
    weir_proxy::tls::install_default_provider();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut c = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls::pki_types::ServerName::try_from("svc.example.com").expect("name"),
    )
    .expect("client");
    let mut out = Vec::new();
    c.write_tls(&mut out).expect("hello");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_carries_http_h2c_tls_and_opaque_tcp() {
    let b = Backend::start("web").await;
    let tls_echo = tcp_echo().await;
    let raw_echo = tcp_echo().await;
    let listeners = format!(
        r#"  - name: mux
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
    - name: envoy.filters.listener.http_inspector
    filter_chains:
    - filter_chain_match: {{transport_protocol: tls}}
{tls}    - filter_chain_match: {{application_protocols: [http/1.1, http/1.0, h2c]}}
{http}    default_filter_chain:
{raw}"#,
        tls = tcp_filters("tls", "tls_echo"),
        http = hcm_filters("web", ""),
        raw = tcp_filters("opaque", "raw_echo"),
    );
    let clusters = format!(
        "{}{}{}",
        cluster("web", &[b.port()]),
        cluster("tls_echo", &[tls_echo.port()]),
        cluster("raw_echo", &[raw_echo.port()])
    );
    let p = Proxy::start(&bootstrap(&listeners, &clusters)).await;
    let a = p.addr("mux");

    // HTTP/1.1 -> the HTTP chain.
    let (s, _, body) = get(a, "x", "/h1").await;
    assert_eq!(s, 200);
    assert_eq!(json(&body)["backend"], "web");
    // HTTP/1.0 too.
    let r = raw(
        a,
        b"GET /h10 HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(r.starts_with("HTTP/1."), "{r}");
    assert!(r.contains("\"backend\":\"web\""), "{r}");
    // h2c (prior knowledge) -> the HTTP chain.
    let mut h2 = h2_client(a).await;
    let resp = h2
        .send_request(
            http::Request::get(format!("http://{a}/h2"))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("h2 response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(json(&body)["backend"], "web");
    // TLS -> the TLS chain (passthrough to an echo: the ClientHello comes back unchanged).
    let hello = client_hello();
    let mut t = TcpStream::connect(a).await.expect("connect");
    t.write_all(&hello).await.expect("write");
    assert_eq!(read_n(&mut t, hello.len()).await, hello);
    drop(t);
    // Opaque TCP -> the default chain.
    let mut o = TcpStream::connect(a).await.expect("connect");
    o.write_all(b"hello opaque\n").await.expect("write");
    assert_eq!(read_n(&mut o, 13).await, b"hello opaque\n");
    drop(o);

    eventually("inspector stats", || {
        p.stat("http_inspector.http11_found") == 1
            && p.stat("http_inspector.http10_found") == 1
            && p.stat("http_inspector.http2_found") == 1
            && p.stat("http_inspector.http_not_found") == 1
            && p.stat("tls_inspector.tls_found") == 1
            && p.stat("tcp.tls.downstream_cx_total") == 1
            && p.stat("tcp.opaque.downstream_cx_total") == 1
    })
    .await;
    assert_eq!(b.hits(), 3);
    // The TLS connection never reached the HTTP inspector.
    assert_eq!(p.stat("http_inspector.read_error"), 0);
    p.stop().await;
}

/// A server-speaks-first backend: greets, then echoes.
async fn greeter() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(b"220 ready\r\n").await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_continues_after_the_listener_filter_timeout() {
    let g = greeter().await;
    let listener = |name: &str, cont: bool| {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters_timeout: 0.3s
    continue_on_listener_filters_timeout: {cont}
    listener_filters:
    - name: envoy.filters.listener.http_inspector
    - name: envoy.filters.listener.tls_inspector
    default_filter_chain:
{}"#,
            tcp_filters(name, "greeter")
        )
    };
    let yaml = bootstrap(
        &format!("{}{}", listener("cont", true), listener("strict", false)),
        &cluster("greeter", &[g.port()]),
    );
    let p = Proxy::start(&yaml).await;

    // The client says nothing: after the timeout the connection goes on to the chain and
    // the server's greeting arrives; the client then talks.
    let mut c = TcpStream::connect(p.addr("cont")).await.expect("connect");
    assert_eq!(read_n(&mut c, 11).await, b"220 ready\r\n");
    c.write_all(b"EHLO x\r\n").await.expect("write");
    assert_eq!(read_n(&mut c, 8).await, b"EHLO x\r\n");
    drop(c);

    // Without continue_on_listener_filters_timeout: closed, nothing from the server.
    let mut c = TcpStream::connect(p.addr("strict")).await.expect("connect");
    assert!(read_for(&mut c, Duration::from_secs(10)).await.is_empty());

    eventually("timeouts counted", || {
        p.stat("listener.127.0.0.1_0.downstream_pre_cx_timeout") == 2
            && p.stat("tcp.cont.downstream_cx_total") == 1
    })
    .await;
    assert_eq!(p.stat("tcp.strict.downstream_cx_total"), 0);
    // Neither inspector decided anything.
    assert_eq!(p.stat("http_inspector.http_not_found"), 0);
    p.stop().await;
}

fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            v.push(0x11);
            v.extend_from_slice(&(12u16 + 7).to_be_bytes());
            v.extend_from_slice(&s.ip().octets());
            v.extend_from_slice(&d.ip().octets());
            v.extend_from_slice(&s.port().to_be_bytes());
            v.extend_from_slice(&d.port().to_be_bytes());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            v.push(0x21);
            v.extend_from_slice(&(36u16 + 7).to_be_bytes());
            v.extend_from_slice(&s.ip().octets());
            v.extend_from_slice(&d.ip().octets());
            v.extend_from_slice(&s.port().to_be_bytes());
            v.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => panic!("mixed families"),
    }
    // One TLV (PP2_TYPE_AUTHORITY "a.com"): skipped.
    v.extend_from_slice(&[0x02, 0x00, 0x04]);
    v.extend_from_slice(b"a.co");
    v
}

fn http_get(prefix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(b"GET /pp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    v
}

async fn raw_bytes(a: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(a).await.expect("connect");
    // The proxy may close before reading everything (malformed header): ignore write errors.
    let _ = s.write_all(bytes).await;
    String::from_utf8_lossy(&read_for(&mut s, Duration::from_secs(10)).await).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_client_address_reaches_xff_access_log_and_rbac() {
    let b = Backend::start("web").await;
    let log = std::env::temp_dir().join(format!("weir-intercept-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log = log.to_str().expect("path");
    let hcm_extra = format!(
        "          use_remote_address: true\n          access_log:\n          - name: envoy.access_loggers.file\n            typed_config: {{'@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{text_format_source: {{inline_string: \"%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %RESPONSE_CODE%\\n\"}}}}}}\n"
    );
    // Network RBAC: only the two client ranges the load balancer reports; the balancer
    // itself (127.0.0.1, the direct peer) is not allowed, so passing means the PROXY address
    // was used.
    let rbac = "      - name: envoy.filters.network.rbac\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC\n          stat_prefix: edge\n          rules:\n            action: ALLOW\n            policies:\n              lb-clients:\n                permissions: [{any: true}]\n                principals: [{remote_ip: {address_prefix: 203.0.113.0, prefix_len: 24}}, {remote_ip: {address_prefix: \"2001:db8::\", prefix_len: 32}}]\n";
    let chain = hcm_filters("web", &hcm_extra).replacen(
        "      filters:\n",
        &format!("      filters:\n{rbac}"),
        1,
    );
    let listeners = format!(
        r#"  - name: edge
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.proxy_protocol
      typed_config: {{"@type": {PP}}}
    filter_chains:
    - filter_chain_match: {{destination_port: 8443}}
{chain}"#
    );
    let p = Proxy::start(&bootstrap(&listeners, &cluster("web", &[b.port()]))).await;
    let a = p.addr("edge");

    // v1: the client address is in XFF and the log; the destination port picks the chain.
    let r = raw_bytes(
        a,
        &http_get(b"PROXY TCP4 203.0.113.7 10.9.8.7 40000 8443\r\n"),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"x-forwarded-for\":\"203.0.113.7\""), "{r}");
    // v2 (IPv6, with a TLV).
    let h = v2_header(
        "[2001:db8::5]:41000".parse().expect("src"),
        "[2001:db8::1]:8443".parse().expect("dst"),
    );
    let r = raw_bytes(a, &http_get(&h)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"x-forwarded-for\":\"2001:db8::5\""), "{r}");
    // v2 IPv4 from a client RBAC does not allow: closed by the network RBAC.
    let h = v2_header(
        "192.0.2.55:1234".parse().expect("src"),
        "10.9.8.7:8443".parse().expect("dst"),
    );
    assert_eq!(raw_bytes(a, &http_get(&h)).await, "");
    // Another destination port: no chain.
    let r = raw_bytes(
        a,
        &http_get(b"PROXY TCP4 203.0.113.7 10.9.8.7 40000 80\r\n"),
    )
    .await;
    assert_eq!(r, "");

    let lines = {
        let mut got = Vec::new();
        for _ in 0..200 {
            got = std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>();
            if got.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        got
    };
    assert_eq!(
        lines,
        vec![
            "203.0.113.7:40000 10.9.8.7:8443 200",
            "[2001:db8::5]:41000 [2001:db8::1]:8443 200"
        ]
    );
    eventually("proxy_proto stats", || {
        p.stat("proxy_proto.versions.v1.found") == 2
            && p.stat("proxy_proto.versions.v2.found") == 2
            && p.stat("edge.rbac.allowed") == 2
            && p.stat("edge.rbac.denied") == 1
            && p.stat("listener.127.0.0.1_0.no_filter_chain_match") == 1
    })
    .await;
    assert_eq!(b.hits(), 2);
    assert_eq!(p.stat("downstream_cx_proxy_proto_error"), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_missing_proxy_header_closes_and_counts() {
    let echo = tcp_echo().await;
    let listener = |name: &str, cfg: &str| {
        format!(
            "  - name: {name}\n    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}\n    \
             listener_filters:\n    - name: envoy.filters.listener.proxy_protocol\n      \
             typed_config: {{\"@type\": {PP}{cfg}}}\n    default_filter_chain:\n{}",
            tcp_filters(name, "echo")
        )
    };
    let yaml = bootstrap(
        &format!(
            "{}{}",
            listener("strict", ", disallowed_versions: [V1]"),
            listener(
                "lenient",
                ", allow_requests_without_proxy_protocol: true, stat_prefix: lenient"
            )
        ),
        &cluster("echo", &[echo.port()]),
    );
    let p = Proxy::start(&yaml).await;
    let strict = p.addr("strict");
    for bad in [
        &b"PROXY TCP4 1.2.3.4\r\nping"[..],        // v1 malformed
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nping", // v1 disallowed
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\x01\x02\x03\x04ping", // v2 truncated addresses
        b"ping without a header",                  // none
    ] {
        assert_eq!(raw_bytes(strict, bad).await, "", "{bad:?}");
    }
    // A client that sends a prefix and stops: closed by listener_filters_timeout (15 s
    // default is too long for a test; the lenient listener below covers the happy paths).
    eventually("strict stats", || {
        p.stat("proxy_proto.versions.v1.error") == 1
            && p.stat("proxy_proto.versions.v1.disallowed") == 1
            && p.stat("proxy_proto.versions.v2.error") == 1
            && p.stat("proxy_proto.not_found_disallowed") == 1
            && p.stat("downstream_cx_proxy_proto_error") == 4
    })
    .await;
    assert_eq!(p.stat("tcp.strict.downstream_cx_total"), 0);

    // allow_requests_without_proxy_protocol: plain bytes pass untouched; a v1 header is
    // consumed (the echo only sees what follows it).
    let lenient = p.addr("lenient");
    let mut c = TcpStream::connect(lenient).await.expect("connect");
    c.write_all(b"plain").await.expect("write");
    assert_eq!(read_n(&mut c, 5).await, b"plain");
    drop(c);
    let mut c = TcpStream::connect(lenient).await.expect("connect");
    c.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nafter")
        .await
        .expect("write");
    assert_eq!(read_n(&mut c, 5).await, b"after");
    drop(c);
    eventually("lenient stats", || {
        p.stat("proxy_proto.lenient.not_found_allowed") == 1
            && p.stat("proxy_proto.lenient.versions.v1.found") == 1
            && p.stat("tcp.lenient.downstream_cx_total") == 2
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_original_dst_hands_off_to_the_destination_listener_or_passes_through() {
    let exact_echo = tcp_echo().await;
    let wild_echo = tcp_echo().await;
    let pass_echo = tcp_echo().await;
    // The virtual listener restores the destination from a PROXY header (what
    // original_dst does behind a NAT REDIRECT), then hands off by that address.
    let listeners = format!(
        r#"  - name: virtual
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
    - name: envoy.filters.listener.proxy_protocol
    default_filter_chain:
{pass}  - name: svc_exact
    address: {{socket_address: {{address: 10.1.2.3, port_value: 80}}}}
    bind_to_port: false
    default_filter_chain:
{exact}  - name: svc_wild
    address: {{socket_address: {{address: 0.0.0.0, port_value: 81}}}}
    bind_to_port: false
    default_filter_chain:
{wild}"#,
        pass = tcp_filters("passthrough", "PassthroughCluster"),
        exact = tcp_filters("exact", "exact_echo"),
        wild = tcp_filters("wild", "wild_echo"),
    );
    let clusters = format!(
        "{}{}  - name: PassthroughCluster\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    \
         connect_timeout: 1s\n    original_dst_lb_config: {{upstream_port_override: {}}}\n",
        cluster("exact_echo", &[exact_echo.port()]),
        cluster("wild_echo", &[wild_echo.port()]),
        pass_echo.port()
    );
    let p = Proxy::start(&bootstrap(&listeners, &clusters)).await;
    let a = p.addr("virtual");
    // The unbound listeners have no socket: nothing listens on their addresses here.
    assert!(TcpStream::connect(("0.0.0.0", 81)).await.is_err());

    let talk = |dst: &str, msg: &'static [u8]| {
        let hdr = format!("PROXY TCP4 192.0.2.9 {dst}\r\n");
        async move {
            let mut c = TcpStream::connect(a).await.expect("connect");
            c.write_all(hdr.as_bytes()).await.expect("write");
            c.write_all(msg).await.expect("write");
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while got.len() < msg.len() {
                match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            got == msg
        }
    };
    let dump = |what: &str| {
        let mut s: Vec<_> = p
            .stats()
            .into_iter()
            .filter(|(k, v)| {
                v != "0"
                    && (k.starts_with("tcp.")
                        || k.starts_with("listener.")
                        || k.starts_with("cluster.Pass")
                        || k.starts_with("proxy_proto"))
            })
            .collect();
        s.sort();
        format!("{what}: {s:?}")
    };
    // The exact address.
    assert!(
        talk("10.1.2.3 5000 80", b"to exact").await,
        "{}",
        dump("exact")
    );
    // 0.0.0.0:81.
    assert!(
        talk("10.7.7.7 5000 81", b"to wild").await,
        "{}",
        dump("wild")
    );
    // No listener for 127.0.0.1:82: the virtual listener's own chain (passthrough to the
    // restored destination with the port overridden to the echo's).
    assert!(
        talk("127.0.0.1 5000 82", b"to passthrough").await,
        "{}",
        dump("passthrough")
    );

    eventually("hand-off stats", || {
        p.stat("tcp.exact.downstream_cx_total") == 1
            && p.stat("tcp.wild.downstream_cx_total") == 1
            && p.stat("tcp.passthrough.downstream_cx_total") == 1
            && p.stat("listener.10.1.2.3_80.downstream_cx_total") == 1
            && p.stat("listener.0.0.0.0_81.downstream_cx_total") == 1
    })
    .await;
    // The passthrough host is the restored destination with the port override.
    assert_eq!(p.stat("cluster.PassthroughCluster.membership_total"), 1);
    assert_eq!(p.stat("cluster.PassthroughCluster.upstream_cx_total"), 1);
    // ... and it is listed by /clusters (text and JSON), as Envoy lists an original-dst
    // cluster's current hosts.
    let host = format!("127.0.0.1:{}", pass_echo.port());
    let (status, _, body) = get(p.admin(), "admin", "/clusters").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&format!("PassthroughCluster::{host}::cx_total::1")),
        "{text}"
    );
    let (_, _, body) = get(p.admin(), "admin", "/clusters?format=json").await;
    let v = json(&body);
    let pass = v["cluster_statuses"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "PassthroughCluster"))
        .expect("PassthroughCluster in /clusters?format=json");
    assert_eq!(
        pass["host_statuses"][0]["address"]["socket_address"]["port_value"],
        pass_echo.port()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_dst_cluster_uses_the_http_header_and_cleans_up_hosts() {
    let b = Backend::start("dst").await;
    let yaml = http_bootstrap(
        &all_to("od", "5s"),
        "  - name: od\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    connect_timeout: 1s\n    \
         cleanup_interval: 0.2s\n    original_dst_lb_config: {use_http_header: true}\n",
        "",
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    let req = |v: Option<String>| {
        let mut r = http::Request::get("/od").header("host", "x");
        if let Some(v) = v {
            r = r.header("x-envoy-original-dst-host", v);
        }
        r.body(Full::new(Bytes::new())).expect("req")
    };
    let (s, _, body) = send(a, req(Some(b.addr.to_string()))).await;
    assert_eq!(s, 200);
    assert_eq!(json(&body)["backend"], "dst");
    assert_eq!(p.stat("cluster.od.membership_total"), 1);
    // Not ip:port: counted, no host.
    let (s, _, _) = send(a, req(Some("example.com:80".into()))).await;
    assert_eq!(s, 503);
    assert_eq!(p.stat("cluster.od.original_dst_host_invalid"), 1);
    // No header and no restored destination (no original_dst filter): no host.
    let (s, _, _) = send(a, req(None)).await;
    assert_eq!(s, 503);
    assert!(p.stat("cluster.od.upstream_cx_none_healthy") >= 2);
    // Unused for a whole cleanup interval: removed.
    eventually("host cleaned up", || {
        p.stat("cluster.od.membership_total") == 0
    })
    .await;
    assert!(p.stat("cluster.od.membership_change") >= 2);
    // And created again on demand.
    let (s, _, _) = send(a, req(Some(b.addr.to_string()))).await;
    assert_eq!(s, 200);
    assert_eq!(b.hits(), 2);
    p.stop().await;
}
