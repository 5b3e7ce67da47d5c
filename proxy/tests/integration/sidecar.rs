//! weir as a transparent sidecar, in real network namespaces: `weir-init` installs the
//! iptables rules in the application's namespace, weir (as uid/gid 1337, the
//! `examples/sidecar/weir.yaml` bootstrap) runs there, and plain HTTP, gRPC (h2c) and raw TCP
//! from the application to a server namespace go through it without the application knowing;
//! inbound connections from a client namespace to the application's port pass through weir's
//! 15006 listener. Skipped (with the reason printed) where namespaces cannot be created,
//! unless `WEIR_REQUIRE_NETNS=1`. See `netns.rs` for the topology.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::netns::{self, NS_WAIT, Net, Ns};

const PROXY_UID: u32 = 1337;
const WEIR: &str = env!("CARGO_BIN_EXE_weir");
const WEIR_INIT: &str = env!("CARGO_BIN_EXE_weir-init");

/// Peers a test server saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<SocketAddr>>>);

impl Seen {
    fn push(&self, a: SocketAddr) {
        self.0.lock().expect("seen").push(a);
    }
    fn all(&self) -> Vec<SocketAddr> {
        self.0.lock().expect("seen").clone()
    }
}

/// An HTTP/1.1 + h2c server answering `name peer=<ip:port> path=<path>`.
fn serve_http(l: TcpListener, name: &'static str) -> Seen {
    let seen = Seen::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            s2.push(peer);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("{name} peer={peer} path={}", req.uri().path());
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    seen
}

/// A real gRPC server (tonic's health service, `weir.svc` SERVING).
async fn serve_grpc(l: TcpListener) -> Seen {
    let seen = Seen::default();
    let s2 = seen.clone();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("weir.svc", tonic_health::ServingStatus::Serving)
        .await;
    let incoming = futures::stream::unfold((l, s2), |(l, seen)| async move {
        let r = l.accept().await.map(|(s, peer)| {
            seen.push(peer);
            s
        });
        Some((r, (l, seen)))
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
    });
    seen
}

/// A TCP echo server.
fn serve_echo(l: TcpListener) -> Seen {
    let seen = Seen::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            s2.push(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    seen
}

/// `grpc.health.v1.Health/Check` for `weir.svc` over h2c from `ns`: the serving status.
async fn grpc_check(ns: &Ns, addr: SocketAddr) -> i32 {
    let s = netns::connect(ns, addr).await.expect("connect gRPC");
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let msg = tonic_health::pb::HealthCheckRequest {
        service: "weir.svc".into(),
    }
    .encode_to_vec();
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(msg.len() as u32);
    frame.put_slice(&msg);
    let req = hyper::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(frame.freeze()))
        .expect("request");
    let resp = tokio::time::timeout(NS_WAIT, tx.send_request(req))
        .await
        .expect("gRPC answer in time")
        .expect("gRPC response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("gRPC body");
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap_or("?").to_string());
    assert_eq!(grpc_status.as_deref(), Some("0"), "grpc-status trailer");
    let body = collected.to_bytes();
    assert!(body.len() >= 5, "gRPC frame: {body:?}");
    tonic_health::pb::HealthCheckResponse::decode(&body[5..])
        .expect("HealthCheckResponse")
        .status
}

/// Write `msg` from `ns` to `addr` over raw TCP, read the echo.
async fn tcp_roundtrip(ns: &Ns, addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = netns::connect(ns, addr).await.expect("connect TCP");
    s.write_all(msg).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    tokio::time::timeout(NS_WAIT, s.read_to_end(&mut out))
        .await
        .expect("echo in time")
        .expect("read echo");
    out
}

fn example_bootstrap() -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sidecar/weir.yaml");
    std::fs::read_to_string(p).expect("examples/sidecar/weir.yaml")
}

/// Start weir as uid/gid 1337 in `role`'s namespace with `yaml`; waits for `/ready`.
async fn start_weir(net: &mut Net, role: &str, yaml: &str) -> (SocketAddr, std::path::PathBuf) {
    let cfg = netns::temp_file("weir.yaml", yaml);
    let log = netns::temp_file("weir.log", "");
    let cfg_s = cfg.to_string_lossy().into_owned();
    net.spawn_as(
        role,
        PROXY_UID,
        &[
            WEIR,
            "-c",
            &cfg_s,
            "--concurrency",
            "1",
            "--drain-time-s",
            "1",
        ],
        &log,
    );
    let admin: SocketAddr = "127.0.0.1:15000".parse().expect("admin");
    netns::wait_ready(&net.ns(role), admin, &log).await;
    (admin, log)
}

fn delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    k: &str,
) -> u64 {
    after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_init_rules_are_idempotent_and_cleanup_restores_the_namespace() {
    if netns::skip("weir_init_rules_are_idempotent") {
        return;
    }
    let net = Net::new(&["app"]).expect("namespaces");
    let pristine = net
        .exec("app", &["iptables", "-t", "nat", "-S"])
        .expect("iptables -S");
    let flags = [
        WEIR_INIT,
        "--proxy-uid",
        "1337",
        "--exclude-outbound-ports",
        "7001",
        "--exclude-outbound-cidrs",
        "192.168.0.0/16",
    ];
    // The dry run prints the restore input and changes nothing.
    let mut dry = flags.to_vec();
    dry.push("--dry-run");
    let plan = net.exec("app", &dry).expect("dry run");
    assert_eq!(
        net.exec("app", &["iptables", "-t", "nat", "-S"])
            .expect("-S"),
        pristine
    );
    assert!(plan.contains("-A OUTPUT -p tcp -j WEIR_OUTPUT\n"), "{plan}");

    net.exec("app", &flags).expect("apply");
    let once = net
        .exec("app", &["iptables", "-t", "nat", "-S"])
        .expect("-S");
    // Every `-A` of the dry run is installed, in order within each chain (the rule text is
    // iptables' canonical form), and nothing else was added.
    for chain in [
        "PREROUTING",
        "OUTPUT",
        "WEIR_INBOUND",
        "WEIR_IN_REDIRECT",
        "WEIR_OUTPUT",
        "WEIR_REDIRECT",
    ] {
        let prefix = format!("-A {chain} ");
        let of = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with(&prefix))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(of(&plan), of(&once), "chain {chain}: dry run == installed");
    }
    assert_eq!(
        plan.lines().filter(|l| l.starts_with("-A ")).count(),
        once.lines().filter(|l| l.starts_with("-A ")).count()
    );
    assert!(
        once.contains("-A WEIR_OUTPUT -p tcp -m tcp --dport 7001 -j RETURN"),
        "{once}"
    );

    net.exec("app", &flags).expect("apply again");
    assert_eq!(
        net.exec("app", &["iptables", "-t", "nat", "-S"])
            .expect("-S"),
        once,
        "a second apply leaves one set of rules"
    );
    // After apply, a dry run has nothing left to add to the built-in chains.
    let plan2 = net.exec("app", &dry).expect("dry run");
    assert!(!plan2.contains("-A OUTPUT"), "{plan2}");

    net.exec("app", &[WEIR_INIT, "--cleanup"]).expect("cleanup");
    assert_eq!(
        net.exec("app", &["iptables", "-t", "nat", "-S"])
            .expect("-S"),
        pristine
    );
    net.exec("app", &[WEIR_INIT, "cleanup"])
        .expect("cleanup is idempotent");
    assert_eq!(
        net.exec("app", &["iptables", "-t", "nat", "-S"])
            .expect("-S"),
        pristine
    );
    // Bad flags: a clear error, nothing changed.
    let e = net
        .exec(
            "app",
            &[WEIR_INIT, "--exclude-outbound-cidrs", "10.0.0.0/99"],
        )
        .expect_err("bad CIDR");
    assert!(e.contains("invalid CIDR \"10.0.0.0/99\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_grpc_tcp_and_inbound_go_through_the_sidecar() {
    if netns::skip("outbound_http_grpc_tcp_and_inbound_go_through_the_sidecar") {
        return;
    }
    let mut net = Net::new(&["client", "app", "server"]).expect("namespaces");
    let (client, app, server) = (net.ns("client"), net.ns("app"), net.ns("server"));

    // Servers in the server namespace, the application's own port in the app namespace.
    let http_seen = serve_http(netns::bind(&server, server.addr(80)), "server");
    let grpc_seen = serve_grpc(netns::bind(&server, server.addr(9090))).await;
    let tcp_seen = serve_echo(netns::bind(&server, server.addr(7000)));
    let excluded_seen = serve_echo(netns::bind(&server, server.addr(7001)));
    let app_seen = serve_http(
        netns::bind(&app, "0.0.0.0:8080".parse().expect("addr")),
        "app",
    );

    net.exec(
        "app",
        &[
            WEIR_INIT,
            "--proxy-uid",
            "1337",
            "--exclude-outbound-ports",
            "7001",
        ],
    )
    .expect("weir-init");
    let (admin, log) = start_weir(&mut net, "app", &example_bootstrap()).await;
    let before = netns::stats(&app, admin).await;

    // Plain HTTP from the application: weir's 0.0.0.0_80 listener (handed off from 15001)
    // routes it to the original destination. The server sees weir's connection, from the
    // app namespace's address, exactly once (weir's own upstream is not captured again).
    let (status, body) = netns::http_get(&app, server.addr(80), "/hello")
        .await
        .expect("HTTP through the sidecar");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("server peer={}:", app.ip)),
        "{body}"
    );
    assert_eq!(http_seen.all().len(), 1, "one upstream connection, no loop");

    // gRPC (h2c) to port 9090: the 0.0.0.0_9090 listener, HTTP/2 upstream.
    assert_eq!(
        grpc_check(&app, server.addr(9090)).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(grpc_seen.all().len(), 1);
    assert_eq!(grpc_seen.all()[0].ip(), std::net::IpAddr::from(app.ip));

    // Raw TCP to a port without a listener: PassthroughCluster.
    assert_eq!(
        tcp_roundtrip(&app, server.addr(7000), b"opaque bytes").await,
        b"opaque bytes"
    );
    assert_eq!(tcp_seen.all().len(), 1);

    // An excluded port bypasses weir.
    assert_eq!(
        tcp_roundtrip(&app, server.addr(7001), b"direct").await,
        b"direct"
    );
    assert_eq!(excluded_seen.all().len(), 1);

    // Inbound: the client namespace calls the application's port; weir's 15006 listener
    // (chain for destination port 8080) delivers it to the app on 127.0.0.1.
    let (status, body) = netns::http_get(&client, app.addr(8080), "/inbound")
        .await
        .expect("inbound HTTP");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("app peer=127.0.0.1:"), "{body}");
    assert_eq!(app_seen.all().len(), 1);

    let after = netns::stats(&app, admin).await;
    let d = |k: &str| delta(&before, &after, k);
    let dump = || {
        format!(
            "stats after:\n{:?}\nlog:\n{}",
            after
                .iter()
                .filter(|(k, _)| k.starts_with("listener.") || k.starts_with("cluster."))
                .collect::<std::collections::BTreeMap<_, _>>(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    assert_eq!(
        d("listener.0.0.0.0_80.downstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("http.outbound_0.0.0.0_80.downstream_rq_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("cluster.outbound_http.upstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("listener.0.0.0.0_9090.downstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("cluster.outbound_grpc.upstream_rq_total"),
        1,
        "{}",
        dump()
    );
    // Only the opaque TCP connection stayed on the virtual listener.
    assert_eq!(
        d("listener.0.0.0.0_15001.downstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("cluster.PassthroughCluster.upstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("listener.0.0.0.0_15006.downstream_cx_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("http.inbound_0.0.0.0_8080.downstream_rq_total"),
        1,
        "{}",
        dump()
    );
    assert_eq!(
        d("cluster.inbound|8080||.upstream_cx_total"),
        1,
        "{}",
        dump()
    );

    // After cleanup, traffic goes direct: the server sees the application itself and weir's
    // counters do not move.
    net.exec("app", &[WEIR_INIT, "--cleanup"]).expect("cleanup");
    assert_eq!(
        tcp_roundtrip(&app, server.addr(7000), b"after").await,
        b"after"
    );
    assert_eq!(tcp_seen.all().len(), 2);
    let last = netns::stats(&app, admin).await;
    assert_eq!(
        delta(
            &after,
            &last,
            "cluster.PassthroughCluster.upstream_cx_total"
        ),
        0
    );
}

/// The example bootstrap plus its IPv6 twins (Istio programs both families): `[::]:15001`
/// and `[::]:15006` (IPv6 only, beside the IPv4 ones on the same ports), and the
/// `bind_to_port: false` `[::]:80` listener the virtual listener hands IPv6 HTTP to.
fn dual_stack_bootstrap() -> String {
    let v6 = r#"  - name: virtualOutbound6
    address: {socket_address: {address: "::", port_value: 15001}}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - name: passthrough
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster6
          cluster: PassthroughCluster
  - name: "[::]_80"
    address: {socket_address: {address: "::", port_value: 80}}
    bind_to_port: false
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound6_80
          route_config:
            name: "80v6"
            virtual_hosts:
            - name: allow_any
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: outbound_http, timeout: 15s}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: virtualInbound6
    address: {socket_address: {address: "::", port_value: 15006}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
    filter_chains:
    - name: inbound_8080
      filter_chain_match: {destination_port: 8080}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound6_8080
          route_config:
            name: inbound6|8080
            virtual_hosts:
            - name: inbound
              domains: ["*"]
              routes: [{match: {prefix: /}, route: {cluster: "inbound|8080||", timeout: 15s}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;
    let base = example_bootstrap();
    let at = base.find("  listeners:\n").expect("listeners") + "  listeners:\n".len();
    format!("{}{v6}{}", &base[..at], &base[at..])
}

/// The same interception over IPv6: `weir-init --ipv6` programs ip6tables, the IPv6
/// original destination is read with `IP6T_SO_ORIGINAL_DST`, and the `[::]` listeners take
/// the hand-off; IPv4 keeps working beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_outbound_and_inbound_go_through_the_sidecar() {
    if netns::skip("ipv6_outbound_and_inbound_go_through_the_sidecar") {
        return;
    }
    let mut net = Net::new(&["client", "app", "server"]).expect("namespaces");
    let (client, app, server) = (net.ns("client"), net.ns("app"), net.ns("server"));

    let http_seen = serve_http(netns::bind(&server, server.addr6(80)), "server6");
    let http4_seen = serve_http(netns::bind(&server, server.addr(80)), "server4");
    let tcp_seen = serve_echo(netns::bind(&server, server.addr6(7000)));
    let app_seen = serve_http(
        netns::bind(&app, "0.0.0.0:8080".parse().expect("addr")),
        "app",
    );

    net.exec("app", &[WEIR_INIT, "--proxy-uid", "1337", "--ipv6"])
        .expect("weir-init --ipv6");
    let (admin, log) = start_weir(&mut net, "app", &dual_stack_bootstrap()).await;
    let before = netns::stats(&app, admin).await;

    // HTTP to an IPv6 server: 15001 over IPv6, handed to [::]:80, routed to the original
    // destination; the server sees weir's connection from the app's IPv6 address, once.
    let (status, body) = netns::http_get(&app, server.addr6(80), "/six")
        .await
        .expect("IPv6 HTTP through the sidecar");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with(&format!("server6 peer=[{}]:", app.ip6)),
        "{body}"
    );
    assert_eq!(http_seen.all().len(), 1, "one upstream connection, no loop");

    // Raw TCP over IPv6: passthrough.
    assert_eq!(
        tcp_roundtrip(&app, server.addr6(7000), b"v6 bytes").await,
        b"v6 bytes"
    );
    assert_eq!(tcp_seen.all().len(), 1);

    // IPv4 beside it still works through the IPv4 listeners.
    let (status, body) = netns::http_get(&app, server.addr(80), "/four")
        .await
        .expect("IPv4 HTTP through the sidecar");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("server4 peer="), "{body}");
    assert_eq!(http4_seen.all().len(), 1);

    // Inbound over IPv6: the client calls the app's IPv6 address; ip6tables sends it to
    // [::]:15006, whose chain for port 8080 delivers it to the app on 127.0.0.1.
    let (status, body) = netns::http_get(&client, app.addr6(8080), "/in6")
        .await
        .expect("inbound IPv6 HTTP");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("app peer=127.0.0.1:"), "{body}");
    assert_eq!(app_seen.all().len(), 1);

    let after = netns::stats(&app, admin).await;
    let dump = || {
        format!(
            "stats after:\n{:?}\nlog:\n{}",
            after
                .iter()
                .filter(|(k, _)| k.starts_with("listener.") || k.starts_with("http."))
                .collect::<std::collections::BTreeMap<_, _>>(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    for (stat, want) in [
        // Envoy's listener stat names for IPv6 addresses: `[::]:80` → `[__]_80`.
        ("listener.[__]_15001.downstream_cx_total", 1),
        ("listener.[__]_80.downstream_cx_total", 1),
        ("http.outbound6_80.downstream_rq_total", 1),
        ("tcp.PassthroughCluster6.downstream_cx_total", 1),
        ("listener.[__]_15006.downstream_cx_total", 1),
        ("http.inbound6_8080.downstream_rq_total", 1),
        ("listener.0.0.0.0_80.downstream_cx_total", 1),
        ("cluster.outbound_http.upstream_cx_total", 2),
    ] {
        assert_eq!(delta(&before, &after, stat), want, "{stat}\n{}", dump());
    }
}
